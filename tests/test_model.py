"""GPT-2 as nanoGPT defines it: init loss, shapes, parameter counts, init scale, tying, attention paths,
weight-decay groups, block cropping, and nanoGPT checkpoint interoperability."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanogpt.model
from nanogpt.model import GPT, GPTConfig, KVCache

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def test_config_defaults_are_nanogpts():
    c = GPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.dropout, c.bias) == (
        1024, 50304, 12, 12, 768, 0.0, True,
    )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_embd=30 must be divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="GPTConfig.n_layer"):
        GPTConfig(n_layer=0)


@pytest.mark.parametrize("vocab_size", [65, 1000, 50304])
def test_init_loss_is_ln_vocab(vocab_size):
    # N(0, 0.02) weights give near-uniform predictions: loss ~ ln(V) (4.17, 6.91, 10.83)
    model = tiny(vocab_size=vocab_size, n_embd=16, n_head=2)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab_size, (4, 16), generator=g)
    targets = torch.randint(0, vocab_size, (4, 16), generator=g)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(vocab_size)) < 0.1


def test_logit_shapes():
    model = tiny()
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 64) and loss is None
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 64) and loss.shape == ()


def test_too_long_input_is_an_error():
    with pytest.raises(ValueError, match="length 17, block size is only 16"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_ignore_index_minus_one():
    model = tiny()
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, 4:] = -1
    _, loss_masked = model(idx, targets)
    logits, _ = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 64), idx[:, :4].reshape(-1))
    torch.testing.assert_close(loss_masked, expected)


def test_num_params_by_hand():
    # V=64, T=16, L=2, C=32. Per block: ln_1 2C + c_attn 3C^2+3C + c_proj C^2+C + ln_2 2C + c_fc 4C^2+4C
    # + c_proj 4C^2+C = 12C^2+13C = 12704. Total: wte V*C 2048 (shared with lm_head) + wpe T*C 512
    # + 2*12704 + ln_f 2C 64 = 28032; non-embedding drops wpe: 27520.
    model = tiny()
    assert model.get_num_params(non_embedding=False) == 28032
    assert model.get_num_params() == 27520
    # without bias: per block 12C^2 + 2C (the two LayerNorm gains) = 12352; 2048 + 512 + 24704 + ln_f 32 = 27296
    assert tiny(bias=False).get_num_params(non_embedding=False) == 27296


def test_gpt2_124m_param_count():
    # nanoGPT prints "number of parameters: 123.69M" for GPT-2 124M with the padded vocab (meta: no memory):
    # wte 50304*768 = 38,633,472 + 12 blocks * (12*768^2 + 13*768) = 85,054,464 + ln_f 1,536
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert model.get_num_params() == 123_689_472


def test_c_proj_init_std_is_scaled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=16, vocab_size=64))
    expected = 0.02 / math.sqrt(2 * 8)  # 0.005
    for i in range(8):
        for w in (model.transformer.h[i].attn.c_proj.weight, model.transformer.h[i].mlp.c_proj.weight):
            assert abs(w.std().item() - expected) < 0.05 * expected
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001
    assert abs(model.transformer.wpe.weight.std().item() - 0.02) < 0.001
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0.0


def test_weight_tying_shares_storage():
    model = tiny()
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_flash_and_manual_attention_agree():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    flash_logits, flash_loss = model(idx, idx)
    for block in model.transformer.h:
        block.attn.flash = False
    manual_logits, manual_loss = model(idx, idx)
    torch.testing.assert_close(manual_logits, flash_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(manual_loss, flash_loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flash", [True, False])
def test_cached_forward_in_chunks_matches_full_forward(flash):
    # prefill 5 tokens, then a chunk of 4 (bottom-right causal mask), then single tokens
    model = tiny()
    for block in model.transformer.h:
        block.attn.flash = flash
    idx = torch.randint(0, 64, (2, 12))
    full, _ = model(idx, idx)  # (2, 12, V)
    cache = model.new_kv_cache()
    pieces = []
    for start, end in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 12)]:
        logits, _ = model(idx[:, start:end], idx[:, start:end], kv_cache=cache)
        pieces.append(logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_grow_past_its_size():
    cache = KVCache(n_layer=1, max_len=4)
    cache.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    cache.advance(4)
    with pytest.raises(ValueError, match="holds 4 positions, asked to grow to 5"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_configure_optimizers_decay_groups(caplog):
    # L=2, C=32, V=64, T=16. Decayed (dim >= 2): wte (= lm_head, counted once), wpe, and per block c_attn,
    # attn.c_proj, c_fc, mlp.c_proj weights: 2 + 4*2 = 10 tensors, 2048 + 512 + 2*(3072 + 1024 + 4096 + 4096)
    # = 27136 parameters. Not decayed: per block ln_1 w/b, c_attn b, attn.c_proj b, ln_2 w/b, c_fc b,
    # mlp.c_proj b = 8, plus ln_f w/b: 18 tensors, 2*(64 + 96 + 32 + 64 + 128 + 32) + 64 = 896 parameters.
    model = tiny()
    with caplog.at_level("INFO", logger="nanogpt.model"):
        opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, betas=(0.9, 0.95), device_type="cpu")
    decay, nodecay = opt.param_groups
    assert (len(decay["params"]), len(nodecay["params"])) == (10, 18)
    assert sum(p.numel() for p in decay["params"]) == 27136
    assert sum(p.numel() for p in nodecay["params"]) == 896
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.get_num_params(False)
    assert (decay["weight_decay"], nodecay["weight_decay"]) == (0.1, 0.0)
    assert decay["lr"] == 6e-4 and decay["betas"] == (0.9, 0.95)
    assert not decay.get("fused")
    assert "num decayed parameter tensors: 10, with 27,136 parameters" in caplog.text
    assert "num non-decayed parameter tensors: 18, with 896 parameters" in caplog.text


def test_crop_block_size():
    config = GPTConfig(**TINY)
    model = GPT(config).eval()
    idx = torch.randint(0, 64, (2, 8))
    before, _ = model(idx, idx)
    model.crop_block_size(8)
    assert model.config.block_size == 8 and config.block_size == 16  # the caller's config is untouched
    assert model.transformer.wpe.weight.shape == (8, 32)
    after, _ = model(idx, idx)
    torch.testing.assert_close(after, before)  # positions 0..7 keep their embeddings
    with pytest.raises(ValueError, match="block size is only 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert model.generate(idx[:1, :4], 10).shape == (1, 14)  # generation crops to the new block
    with pytest.raises(ValueError):
        model.crop_block_size(9)


def test_estimate_mfu_is_none_on_cpu():
    assert tiny().estimate_mfu(fwdbwd_per_iter=8, dt=0.1) is None


def test_estimate_mfu_looks_up_the_gpu(monkeypatch):
    # flops/iter = 177408 FLOP/token * 16 tokens * 10 sequences = 28,385,280 in 1e-6 s = 28.38528 TFLOP/s,
    # which is 9.0978% of an A100's 312 bf16 TFLOP/s and 145.56% of its 19.5 fp32 TFLOP/s
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    model = tiny()
    assert model.estimate_mfu(10, 1e-6, device="cuda") == pytest.approx(28385280e6 / 312e12)
    assert model.estimate_mfu(10, 1e-6, device="cuda", dtype=torch.float32) == pytest.approx(28385280e6 / 19.5e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert model.estimate_mfu(10, 1e-6, device="cuda") is None


def test_flops_per_token_by_hand():
    # 6N + 12*L*H*Q*T = 6*27520 + 12*2*2*16*16 = 165120 + 12288
    assert tiny().flops_per_token() == 177408


# nanoGPT's model.py (flash path) state dict for n_layer=1, bias=True, written out from its module definitions.
NANOGPT_KEYS_1_LAYER = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight",
    "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight",
    "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight",
    "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
    "lm_head.weight",
]


def test_state_dict_keys_are_nanogpts():
    assert list(tiny(n_layer=1).state_dict()) == NANOGPT_KEYS_1_LAYER
    # bias=False: nanoGPT's LayerNorm and Linears then have no bias entries at all
    expected = [k for k in NANOGPT_KEYS_1_LAYER if not k.endswith(".bias")]
    assert list(tiny(n_layer=1, bias=False).state_dict()) == expected
    # forcing the manual attention path adds no buffer (nanoGPT's would add transformer.h.0.attn.bias)
    model = tiny(n_layer=1)
    model.transformer.h[0].attn.flash = False
    assert list(model.state_dict()) == NANOGPT_KEYS_1_LAYER


def test_nanogpt_non_flash_state_dict_loads_directly():
    # nanoGPT without flash attention saves transformer.h.{i}.attn.bias (the causal mask); plain strict
    # load_state_dict skips it, while a genuinely unexpected key is still an error
    source, target = tiny(), tiny(vocab_size=64, n_embd=32)
    torch.nn.init.normal_(source.transformer.wpe.weight)
    sd = dict(source.state_dict())
    for i in range(2):
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    target.load_state_dict(sd)
    assert torch.equal(target.transformer.wpe.weight, source.transformer.wpe.weight)
    with pytest.raises(RuntimeError, match="transformer.h.0.attn.scale"):
        target.load_state_dict({**sd, "transformer.h.0.attn.scale": torch.ones(1)})


def test_import_does_not_pull_ray_or_mlflow():
    code = "import sys, nanogpt.model, nanogpt.hf, nanogpt.metrics; print(sorted({'ray', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_model_file_holds_the_architecture_only():
    """nanoGPT's readability: model.py imports torch and the standard library (and the MFU table), and reads or
    writes no files; loading and saving checkpoints, nanoGPT's ckpt.pt included, is nanogpt/checkpoint/'s job."""
    import ast

    tree = ast.parse(Path(nanogpt.model.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "inspect", "logging", "math", "contextlib", "dataclasses", "typing", "torch",
                        "torch.nn", "nanogpt", "nanogpt.weight_layout"}, imported
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert not {c for c in calls if c.startswith(("torch.load", "torch.save", "open", "os."))}
