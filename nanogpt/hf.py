"""Hugging Face GPT-2 weights in both directions, as a name map plus a transpose list (litgpt style).

    model = from_pretrained("gpt2")                      # hub: gpt2, gpt2-medium, gpt2-large, gpt2-xl
    model = from_pretrained("/path/to/hf_gpt2_dir")       # config.json + model.safetensors | pytorch_model.bin
    export_hf(model, "out/hf")                            # transformers.GPT2LMHeadModel.from_pretrained("out/hf")

Needs the optional extra `pip install 'nanogpt-ray[hf]'` (safetensors, huggingface_hub via transformers); the
imports are inside the functions so `import nanogpt.hf` works without it.

Two differences between the architectures are worth knowing:
- HF's GPT-2 stores its matmul weights as Conv1D, (in, out): the keys in TRANSPOSED are transposed both ways.
- OpenAI's GPT-2 uses the tanh approximation of GELU ("gelu_new"); our MLP, like nanoGPT's, uses exact GELU.
  The two differ by at most 4.7e-4 per activation, so imported GPT-2 weights give logits slightly different
  from HF's (nanoGPT has the same gap); an exported model says activation_function="gelu" (exact) in its
  config.json and matches HF to float precision.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from nanogpt.checkpoint.weight_shapes import meta_state_dict
from nanogpt.model import GPT, GPTConfig

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'nanogpt-ray[hf]'"

# The four released GPT-2 sizes (all: vocab 50257, block 1024, bias True) and their hub repositories.
GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M params
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M params
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M params
}
HUB_REPOS: dict[str, str] = {name: f"openai-community/{name}" for name in GPT2_SIZES}

# HF GPT2LMHeadModel key -> our key, `{}` is the layer number. nanoGPT chose HF's module names, so the map is
# the identity; it is still spelled out, because it is the list of what must be there.
HF_TO_NANOGPT: dict[str, str | None] = {
    "transformer.wte.weight": "transformer.wte.weight",
    "transformer.wpe.weight": "transformer.wpe.weight",
    "transformer.h.{}.ln_1.weight": "transformer.h.{}.ln_1.weight",
    "transformer.h.{}.ln_1.bias": "transformer.h.{}.ln_1.bias",
    "transformer.h.{}.attn.c_attn.weight": "transformer.h.{}.attn.c_attn.weight",
    "transformer.h.{}.attn.c_attn.bias": "transformer.h.{}.attn.c_attn.bias",
    "transformer.h.{}.attn.c_proj.weight": "transformer.h.{}.attn.c_proj.weight",
    "transformer.h.{}.attn.c_proj.bias": "transformer.h.{}.attn.c_proj.bias",
    "transformer.h.{}.ln_2.weight": "transformer.h.{}.ln_2.weight",
    "transformer.h.{}.ln_2.bias": "transformer.h.{}.ln_2.bias",
    "transformer.h.{}.mlp.c_fc.weight": "transformer.h.{}.mlp.c_fc.weight",
    "transformer.h.{}.mlp.c_fc.bias": "transformer.h.{}.mlp.c_fc.bias",
    "transformer.h.{}.mlp.c_proj.weight": "transformer.h.{}.mlp.c_proj.weight",
    "transformer.h.{}.mlp.c_proj.bias": "transformer.h.{}.mlp.c_proj.bias",
    "transformer.ln_f.weight": "transformer.ln_f.weight",
    "transformer.ln_f.bias": "transformer.ln_f.bias",
    # tied to transformer.wte.weight on both sides: checked equal on import, not written on export
    "lm_head.weight": None,
}
# Conv1D weights, stored (in, out) by HF and (out, in) by nn.Linear.
TRANSPOSED: tuple[str, ...] = (
    "transformer.h.{}.attn.c_attn.weight",
    "transformer.h.{}.attn.c_proj.weight",
    "transformer.h.{}.mlp.c_fc.weight",
    "transformer.h.{}.mlp.c_proj.weight",
)
# Buffers of older HF GPT-2 checkpoints (the causal mask and the -1e4 fill value): constants, not weights.
_IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"\.h\.(\d+)\.")

# GELU flavours HF's GPT-2 may name; all are approximations of (or equal to) our exact nn.GELU.
_GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Hugging Face GPT-2 conversion needs {module!r}: {_INSTALL_HINT}") from e


def _layer_template(key: str) -> tuple[str, int | None]:
    """'transformer.h.3.ln_1.weight' -> ('transformer.h.{}.ln_1.weight', 3); keys outside the blocks -> (key, None)."""
    m = _LAYER.search(key)
    if m is None:
        return key, None
    return key[: m.start()] + ".h.{}." + key[m.end():], int(m.group(1))


def config_from_hf(hf_config: dict[str, Any], dropout: float = 0.0) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json dict; refuses GPT-2 variants this architecture cannot represent."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json model_type is {hf_config['model_type']!r}, only 'gpt2' can be converted")
    n_embd = hf_config.get("n_embd", 768)
    # settings our blocks hard-code, with the value they must have
    fixed = {
        "n_inner": (None, 4 * n_embd),
        "layer_norm_epsilon": (1e-5,),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    }
    for name, allowed in fixed.items():
        if name in hf_config and hf_config[name] not in allowed:
            raise ValueError(f"config.json {name}={hf_config[name]!r} is not supported (must be one of {allowed})")
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in _GELUS:
        raise ValueError(f"config.json activation_function={activation!r} is not supported (must be one of {_GELUS})")
    if activation != "gelu":
        logger.warning(
            "config.json activation_function=%r approximates GELU (within 4.7e-4); this model uses exact GELU "
            "as nanoGPT does, so its logits differ slightly from Hugging Face's", activation,
        )
    if hf_config.get("tie_word_embeddings", True) is False:
        logger.info("config.json has tie_word_embeddings=false; lm_head.weight must still equal wte to load")
    return GPTConfig(
        block_size=hf_config.get("n_positions", 1024),
        vocab_size=hf_config.get("vocab_size", 50257),
        n_layer=hf_config.get("n_layer", 12),
        n_head=hf_config.get("n_head", 12),
        n_embd=n_embd,
        dropout=dropout,
        bias=True,  # GPT-2 has biases everywhere
    )


def _read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face checkpoint directory: safetensors (single or sharded) or pytorch_model.bin."""
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    binary = model_dir / "pytorch_model.bin"
    if single.is_file() or index.is_file():
        safetensors_torch = _require("safetensors.torch")
        if single.is_file():
            return safetensors_torch.load_file(str(single), device="cpu")
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            if not isinstance(shard, str) or shard != Path(shard).name or shard in ("", ".."):
                raise ValueError(f"{index}: names {shard!r} as a weight file, which is not a file of {model_dir}")
        state_dict = {}
        for shard in shards:
            state_dict.update(safetensors_torch.load_file(str(model_dir / shard), device="cpu"))
        return state_dict
    if binary.is_file():
        # weights_only: a .bin is a pickle, and a pickle can run code
        try:
            return torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: whatever a hostile or broken file raises
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{binary}: refused to load: it is not a plain tensor file ({first_line}); convert it "
                             "to model.safetensors with a trusted tool") from None
    raise FileNotFoundError(f"{model_dir} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def hf_to_nanogpt_state_dict(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and transpose HF GPT-2 tensors into our layout. `transformer.wte.weight` stands for the tied
    lm_head too. Keys with no place in the map raise a KeyError naming them."""
    converted: dict[str, torch.Tensor] = {}
    lm_head = None
    for hf_key, tensor in hf_state_dict.items():
        # GPT2Model checkpoints (the original hub files) have no "transformer." prefix and no lm_head
        if not hf_key.startswith(("transformer.", "lm_head.")):
            hf_key = "transformer." + hf_key
        if _IGNORED.search(hf_key):
            continue
        template, layer = _layer_template(hf_key)
        if template not in HF_TO_NANOGPT:
            raise KeyError(f"unexpected key {hf_key!r} in the Hugging Face checkpoint")
        if template == "lm_head.weight":
            lm_head = tensor
            continue
        key = HF_TO_NANOGPT[template]
        key = key.format(layer) if layer is not None else key
        converted[key] = tensor.t() if template in TRANSPOSED else tensor
    if lm_head is not None and "transformer.wte.weight" in converted:
        if not torch.equal(lm_head, converted["transformer.wte.weight"]):
            raise ValueError("lm_head.weight differs from transformer.wte.weight; this model ties them")
    return converted


def load_hf_state_dict(model: GPT, hf_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy HF GPT-2 tensors into `model`, after checking every key and shape (errors name the key)."""
    converted = hf_to_nanogpt_state_dict(hf_state_dict)
    _check_converted(model.state_dict(), converted)
    _copy_converted(model, converted)


def _check_converted(sd: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> None:
    """KeyError or ValueError naming the first key of the model's state dict `sd` (on any device, meta too) that
    the converted tensors miss, have unexpected, or shape differently."""
    expected = {k for k in sd if k != "lm_head.weight"}  # tied: filled through transformer.wte.weight
    missing = sorted(expected - set(converted))
    if missing:
        raise KeyError(f"key {missing[0]!r} is missing from the Hugging Face checkpoint ({len(missing)} missing)")
    unexpected = sorted(set(converted) - expected)
    if unexpected:
        raise KeyError(f"unexpected key {unexpected[0]!r} in the Hugging Face checkpoint")
    for key in sorted(expected):
        if converted[key].shape != sd[key].shape:
            raise ValueError(
                f"shape mismatch for {key!r}: checkpoint has {tuple(converted[key].shape)} "
                f"(after transposing Conv1D weights), the model expects {tuple(sd[key].shape)}"
            )


def _copy_converted(model: GPT, converted: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    with torch.no_grad():
        for key in converted:
            sd[key].copy_(converted[key])


def from_pretrained(model_type_or_dir: str | os.PathLike[str], override_args: dict[str, Any] | None = None) -> GPT:
    """GPT from a local HF GPT-2 directory, or from the hub for 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'
    (an existing directory of that name wins). Only `dropout` may be overridden (nanoGPT's rule: everything else
    is fixed by the weights). The model comes back in train mode, on the CPU, in fp32."""
    override_args = dict(override_args or {})
    for name in override_args:
        if name != "dropout":
            raise ValueError(f"override_args may only set 'dropout', got {name!r}")
    model_dir = Path(model_type_or_dir)
    if not model_dir.is_dir():
        name = str(model_type_or_dir)
        if name not in GPT2_SIZES:
            raise ValueError(f"{name!r} is neither a directory nor one of {sorted(GPT2_SIZES)}")
        hub = _require("huggingface_hub")
        logger.info("loading weights from pretrained gpt: %s", name)
        model_dir = Path(hub.snapshot_download(HUB_REPOS[name], allow_patterns=["config.json", "model.safetensors"]))
    hf_config = json.loads((model_dir / "config.json").read_text())
    config = config_from_hf(hf_config, dropout=override_args.get("dropout", 0.0))
    size = GPT2_SIZES.get(str(model_type_or_dir))
    if size is not None and any(getattr(config, k) != v for k, v in size.items()):
        got = {k: getattr(config, k) for k in size}
        raise ValueError(f"{model_type_or_dir}'s config.json gives {got}, not its known size {size}")
    converted = hf_to_nanogpt_state_dict(_read_hf_weights(model_dir))
    # config.json may declare any size: the weights are checked against a model on the meta device (no storage)
    # before one of that size is allocated
    try:
        expected = meta_state_dict(config, converted)
    except ValueError as e:
        raise ValueError(f"{model_dir / 'config.json'}: does not fit the weights beside it ({e})") from None
    _check_converted(expected, converted)
    model = GPT(config)
    _copy_converted(model, converted)
    return model


def hf_config_dict(config: GPTConfig, vocab_size: int | None = None) -> dict[str, Any]:
    """A GPT2Config config.json dict describing our architecture (exact GELU, our dropout, our vocab)."""
    vocab_size = vocab_size or config.vocab_size
    eot = 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>, only if the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu",  # exact GELU, nn.GELU(); GPT-2's own is "gelu_new"
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
    }


def export_hf(model: GPT, out_dir: str | os.PathLike[str], vocab_size: int | None = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads.

    The vocabulary is exported as the model has it: a model trained with nanoGPT's padded 50304 exports 50304
    logits, of which the 47 past GPT-2's 50257 are never produced by the tokenizer (and are pushed down in
    training). Pass vocab_size=50257 to cut wte/lm_head to the tokenizer's size; the kept logits are unchanged.
    The weights keep their dtype; lm_head.weight is not written (tied to transformer.wte.weight). HF GPT-2 always
    has biases: a bias=False model (nanoGPT's default) is exported with zero biases, which computes the same thing.
    """
    safetensors_torch = _require("safetensors.torch")
    if vocab_size is not None and not 0 < vocab_size <= model.config.vocab_size:
        raise ValueError(f"vocab_size must be in (0, {model.config.vocab_size}], got {vocab_size}")
    nanogpt_to_hf = {v: k for k, v in HF_TO_NANOGPT.items() if v is not None}
    tensors = {}
    for key, tensor in _with_zero_biases(model.state_dict()).items():
        if key == "lm_head.weight":
            continue
        template, layer = _layer_template(key)
        hf_template = nanogpt_to_hf[template]
        hf_key = hf_template.format(layer) if layer is not None else hf_template
        if hf_template in TRANSPOSED:
            tensor = tensor.t()
        if key == "transformer.wte.weight" and vocab_size is not None:
            tensor = tensor[:vocab_size]
        tensors[hf_key] = tensor.detach().cpu().contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config, vocab_size), indent=2) + "\n")
    safetensors_torch.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    logger.info("exported %d tensors to %s", len(tensors), out)
    return out


def _with_zero_biases(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the zero bias of every LayerNorm and Linear that has none (bias=False), sized by its output."""
    out = dict(state_dict)
    for key, weight in state_dict.items():
        if key.endswith(".weight") and key not in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            bias_key = key.removesuffix(".weight") + ".bias"
            if bias_key not in out:
                out[bias_key] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return out
