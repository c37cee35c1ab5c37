"""nanoGPT's ckpt.pt both ways (nanogpt/checkpoint/nanogpt_ckpt.py), and state dicts cleaned of wrapper prefixes
(nanogpt/checkpoint/state_dict_keys.py)."""

from __future__ import annotations

import pytest
import torch

from nanogpt.checkpoint.format import load_checkpoint
from nanogpt.checkpoint.nanogpt_ckpt import export_nanogpt_ckpt, load_nanogpt_ckpt
from nanogpt.checkpoint.state_dict_keys import clean_state_dict
from nanogpt.model import GPT, GPTConfig, KVCache
from tests.test_checkpoint import save, trained_model
from tests.test_model import tiny


def test_clean_state_dict_strips_prefixes_and_mask_buffers():
    w = torch.zeros(1)
    sd = {
        "_orig_mod.transformer.wte.weight": w,
        "module.transformer.wpe.weight": w,
        "module._orig_mod.transformer.h.0.attn.c_attn.bias": w,
        "_orig_mod.module.transformer.h.0.attn.bias": w,  # nanoGPT's non-flash causal mask: dropped
        "transformer.h.0._orig_mod.mlp.c_fc.weight": w,
        "lm_head.weight": w,
    }
    assert list(clean_state_dict(sd)) == [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.mlp.c_fc.weight",
        "lm_head.weight",
    ]




def _nanogpt_ckpt(model: GPT, prefix: str, with_mask_buffers: bool = False) -> dict:
    """A checkpoint dict laid out as nanoGPT's train.py saves it."""
    sd = dict(model.state_dict())
    if with_mask_buffers:  # what nanoGPT's non-flash path registers: (1, 1, T, T) lower-triangular ones
        T = model.config.block_size
        for i in range(model.config.n_layer):
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    c = model.config
    model_args = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size,
                      bias=c.bias, vocab_size=c.vocab_size, dropout=c.dropout)
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    return {
        "model": {prefix + k: v for k, v in sd.items()},
        "optimizer": optimizer.state_dict(),
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),  # nanoGPT stores the estimate_loss() tensor
        "config": {"out_dir": "out", "batch_size": 12, "learning_rate": 1e-3, "compile": True, "dtype": "bfloat16"},
    }


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module.", "module._orig_mod.", "_orig_mod.module."])
def test_load_nanogpt_ckpt(tmp_path, prefix):
    model = tiny()
    path = tmp_path / "ckpt.pt"
    torch.save(_nanogpt_ckpt(model, prefix, with_mask_buffers=prefix == "module."), path)
    loaded = load_nanogpt_ckpt(path)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.transformer.wte.weight is loaded.lm_head.weight  # tying survives loading


def test_load_nanogpt_ckpt_explains_unsafe_pickles(tmp_path):
    ckpt = _nanogpt_ckpt(tiny(), "")
    ckpt["config"] = {"scheduler": KVCache(1, 1)}  # an arbitrary object: refused by weights_only=True
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    with pytest.raises(RuntimeError, match="(?s)weights_only=True.*build_from_nanogpt_ckpt"):
        load_nanogpt_ckpt(path)


def test_load_nanogpt_ckpt_rejects_unknown_model_args(tmp_path):
    ckpt = _nanogpt_ckpt(tiny(), "")
    ckpt["model_args"]["n_kv_head"] = 2
    path = tmp_path / "ckpt.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="n_kv_head"):
        load_nanogpt_ckpt(path)


def test_export_nanogpt_ckpt_loads_with_weights_only(tmp_path):
    model, optimizer = trained_model()
    path = save(tmp_path / "c", model, optimizer)
    out = export_nanogpt_ckpt(path, tmp_path / "ckpt.pt")
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["iter_num"] == 7 and ckpt["best_val_loss"] == 1.25
    assert ckpt["config"]["model.n_layer"] == 2 and ckpt["config"]["n_layer"] == 2
    assert "seed" not in ckpt["config"]  # data.seed and train.seed: ambiguous without a section
    assert all(v is None or isinstance(v, (str, int, float, bool)) for v in ckpt["config"].values())
    # nanoGPT's sample.py: GPTConfig(**model_args), then a strict load_state_dict
    fresh = GPT(GPTConfig(**ckpt["model_args"]))
    fresh.load_state_dict(ckpt["model"], strict=True)
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(fresh.eval()(idx)[0], model.eval()(idx)[0])
    assert torch.equal(load_nanogpt_ckpt(out).eval()(idx)[0], model(idx)[0])
    # nanoGPT's optimizer (same two groups, same parameter order) takes the state
    fresh.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").load_state_dict(ckpt["optimizer"])


def test_a_nanogpt_run_comes_back_as_it_left(tmp_path):
    """nanoGPT's ckpt.pt -> a GPT -> our checkpoint -> nanoGPT's ckpt.pt again: the same weights, model_args and
    step, through the one module that reads and writes the format."""
    torch.save(_nanogpt_ckpt(tiny(), "_orig_mod."), tmp_path / "ckpt.pt")
    model = load_nanogpt_ckpt(tmp_path / "ckpt.pt")
    again = load_nanogpt_ckpt(export_nanogpt_ckpt(save(tmp_path / "c", model, step=250), tmp_path / "again.pt"))
    assert again.config == model.config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert load_checkpoint(tmp_path / "c").step == torch.load(tmp_path / "again.pt", weights_only=True)["iter_num"]
