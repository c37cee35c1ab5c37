"""Hugging Face GPT-2 both ways, against a tiny random GPT2LMHeadModel built locally (no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from nanogpt.hf import GPT2_SIZES, HF_TO_NANOGPT, TRANSPOSED, export_hf, from_pretrained  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402

V, T = 96, 16


def hf_tiny(activation: str = "gelu", vocab_size: int = V) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=T, vocab_size=vocab_size, activation_function=activation,
        bos_token_id=0, eos_token_id=0,
    )
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).eval()
    # HF initialises biases and LayerNorms to 0/1: randomise them so the comparison covers every tensor
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(hf_model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(idx).logits


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(1))


def test_import_matches_hf_logits(tmp_path, idx):
    hf_model = hf_tiny()
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path)).eval()
    assert model.config == GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    logits, _ = model(idx, idx)
    torch.testing.assert_close(logits, hf_logits(hf_model, idx), atol=1e-5, rtol=0)


def test_import_of_gpt2model_layout_bin(tmp_path, idx):
    # the original hub checkpoints: no "transformer." prefix, no lm_head, attn.bias/masked_bias buffers, .bin
    hf_model = hf_tiny()
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "config.json")
    model = from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(model(idx, idx)[0], hf_logits(hf_model, idx), atol=1e-5, rtol=0)


def test_gelu_new_checkpoint_loads_with_exact_gelu(tmp_path, idx, caplog):
    # OpenAI's GPT-2 uses tanh-GELU; we (like nanoGPT) run exact GELU: close, not equal, and we say so.
    # c_fc is scaled up so the pre-activations reach the range (|x| ~ 1-3) where the two GELUs differ.
    hf_model = hf_tiny(activation="gelu_new")
    with torch.no_grad():
        for block in hf_model.transformer.h:
            block.mlp.c_fc.weight.mul_(20)
    hf_model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="nanogpt.hf"):
        model = from_pretrained(str(tmp_path)).eval()
    assert "exact GELU" in caplog.text
    gap = (model(idx, idx)[0] - hf_logits(hf_model, idx)).abs().max().item()
    assert 1e-5 < gap < 1e-3  # measured 4.3e-5; an exact-GELU checkpoint gives 1e-7


def test_export_loads_in_transformers(tmp_path, idx):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V)).eval()
    export_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["vocab_size"], config["n_positions"], config["activation_function"]) == (V, T, "gelu")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(hf_logits(hf_model, idx), model(idx, idx)[0], atol=1e-5, rtol=0)
    # and back again: the round trip is exact
    again = from_pretrained(str(tmp_path))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_export_of_a_bias_free_model_writes_zero_biases(tmp_path, idx):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=V, bias=False)).eval()
    export_hf(model, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.count_nonzero(hf_model.transformer.h[1].mlp.c_fc.bias) == 0
    torch.testing.assert_close(hf_logits(hf_model, idx), model(idx, idx)[0], atol=1e-5, rtol=0)


def test_export_keeps_padded_vocab_or_cuts_it(tmp_path, idx):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=T, vocab_size=128)).eval()  # padded
    logits = model(idx, idx)[0]
    export_hf(model, tmp_path / "padded")
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "padded", attn_implementation="eager")
    assert hf_model.config.vocab_size == 128
    export_hf(model, tmp_path / "cut", vocab_size=V)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "cut", attn_implementation="eager")
    assert hf_model.config.vocab_size == V
    torch.testing.assert_close(hf_logits(hf_model.eval(), idx), logits[..., :V], atol=1e-5, rtol=0)


def test_missing_key_is_named(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = safetensors_torch.load_file(path)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    safetensors_torch.save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"transformer\.h\.1\.mlp\.c_fc\.bias"):
        from_pretrained(str(tmp_path))


def test_shape_mismatch_is_named(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = safetensors_torch.load_file(path)
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(32, 31)
    safetensors_torch.save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_proj\.weight.*\(31, 32\).*\(32, 32\)"):
        from_pretrained(str(tmp_path))


def test_unexpected_key_is_named(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = safetensors_torch.load_file(path)
    sd["transformer.h.0.attn.q_attn.weight"] = torch.zeros(32, 32)
    safetensors_torch.save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"transformer\.h\.0\.attn\.q_attn\.weight"):
        from_pretrained(str(tmp_path))


def test_override_args(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    assert from_pretrained(str(tmp_path), override_args={"dropout": 0.1}).config.dropout == 0.1
    with pytest.raises(ValueError, match="'n_layer'"):
        from_pretrained(str(tmp_path), override_args={"n_layer": 4})


def test_unsupported_hf_config_is_named(tmp_path):
    hf_model = hf_tiny()
    hf_model.config.scale_attn_by_inverse_layer_idx = True
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        from_pretrained(str(tmp_path))


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="'gpt3'.*gpt2-xl"):
        from_pretrained("gpt3")


def test_name_map_is_consistent():
    # every transposed key is a map key; the four GPT-2 sizes are nanoGPT's
    assert set(TRANSPOSED) <= set(HF_TO_NANOGPT)
    assert GPT2_SIZES["gpt2-xl"] == dict(n_layer=48, n_head=25, n_embd=1600)
    # the map covers a real GPT2LMHeadModel's state dict, layer by layer
    keys = {k.replace(".0.", ".{}.").replace(".1.", ".{}.") for k in hf_tiny().state_dict()}
    assert keys == set(HF_TO_NANOGPT)
