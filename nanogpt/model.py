"""The GPT-2 language model, as nanoGPT's model.py defines it, plus a KV cache for generation.

One file, top to bottom, torch only:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
3) karpathy/nanoGPT model.py, whose module names, state-dict keys, init and RNG order this file keeps, so that a
   nanoGPT `ckpt.pt` loads here and our weights load in nanoGPT with strict loading
   (nanogpt/checkpoint/nanogpt_ckpt.py converts both ways).

    from nanogpt.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65))
    logits, loss = model(idx, targets)            # (B, T, V), scalar
    out = model.eval().generate(idx, 100, temperature=0.8, top_k=200)   # KV-cached, same tokens as uncached
    model = nanogpt.hf.from_pretrained("gpt2")     # or a local Hugging Face GPT-2 directory

Nothing here knows about devices, DDP, files or the training loop: wrap the model from outside
(`torch.compile(model)`, `DistributedDataParallel(model)`), and strip the wrappers' key prefixes with
nanogpt/checkpoint/state_dict_keys.py when loading what they saved.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt import metrics
from nanogpt.weight_layout import decode_layout

logger = logging.getLogger(__name__)


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig: the same field names and defaults, so `GPTConfig(**ckpt["model_args"])` works both ways."""

    block_size: int = 1024
    """Maximum context length (number of learned position embeddings)."""
    vocab_size: int = 50304
    """GPT-2's vocab_size of 50257, padded up to the nearest multiple of 64 for efficiency."""
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    """True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster."""

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


# What nanoGPT's ckpt.pt carries as model_args. (Which of them a resumed checkpoint must share with the config:
# nanogpt/resumable.py, torch-free for the driver.)
MODEL_ARGS = tuple(f.name for f in fields(GPTConfig))
SIZE_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias. PyTorch's LayerNorm doesn't support simply bias=False."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated up to `max_len` positions.

    Valid only while the whole sequence fits in the block: GPT-2's positions are absolute (wpe), so once
    nanoGPT's window slides (`idx[:, -block_size:]`) every token moves to a new position and every cached key
    and value changes. `GPT.next_token_logits` therefore stops using the cache there and recomputes the
    window, exactly as uncached generation does (a rolling cache would silently diverge: nanoGPT PR #613).
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0  # number of positions filled, the same in every layer between forwards
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this layer's new keys/values (B, nh, T, hs) after the cached ones; return all of them."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to grow to {end}")
        if self.k[layer] is None:
            # allocated on first use, in the dtype the layer computes in (autocast may make it bf16)
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, length+T, hs)

    def advance(self, num_positions: int) -> None:
        """Called by the model once every layer has written `num_positions` new positions."""
        self.length += num_positions

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer_idx = layer_idx  # which slot of a KVCache this layer writes
        # flash attention make GPU go brrrrr but support is only in PyTorch >= 2.0. A plain attribute, so tests
        # (and old torch) can take the manual path. Unlike nanoGPT, the manual path builds its causal mask on the
        # fly instead of registering an `attn.bias` buffer: the state dict is then the same on both paths.
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        # ...but nanoGPT's non-flash model saves that mask as `attn.bias`: skip it, so its state dicts load as-is
        self.register_load_state_dict_pre_hook(_drop_causal_mask_buffer)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

        # with a cache, the T new queries sit at positions [start, start+T) and see keys [0, start+T)
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            k_all, v_all = kv_cache.update(self.layer_idx, k, v)  # (B, nh, start+T, hs)
            if start > 0:  # at start 0 the cache holds exactly k, v: use them, so prefill == uncached forward
                k, v = k_all, v_all
        L = k.size(2)

        # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, L) -> (B, nh, T, L)
        dropout_p = self.dropout if self.training else 0.0
        if self.flash:
            # efficient attention using Flash Attention CUDA kernels
            if start == 0:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # one new token sees every cached key: no mask at all
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=dropout_p)
            else:  # is_causal aligns the mask top-left; queries that start mid-sequence need it bottom-right
                mask = _causal_mask(T, L, x.device)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        else:
            # manual implementation of attention
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, L)
            att = att.masked_fill(~_causal_mask(T, L, x.device), float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, L) x (B, nh, L, hs) -> (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y


def _drop_causal_mask_buffer(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: drop nanoGPT's (1, 1, block_size, block_size) causal-mask buffer."""
    state_dict.pop(prefix + "bias", None)


def _causal_mask(T: int, L: int, device: torch.device) -> torch.Tensor:
    """(T, L) bool, True where query i (at position L-T+i) may attend key j: j <= L-T+i."""
    return torch.ones(T, L, dtype=torch.bool, device=device).tril(diagonal=L - T)


class MLP(nn.Module):

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact GELU, as nanoGPT; OpenAI's GPT-2 used the tanh approximation (nanogpt.hf)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)
        x = self.c_proj(x)  # (B, T, C)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config: GPTConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        # pre-norm: the residual stream x is never normalised, only what each branch reads from it
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        # module creation order and init below are nanoGPT's, so one seed gives nanoGPT's initial weights
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection are one matrix (GPT-2 does this; it saves
        # V*C parameters). Both keys stay in the state dict, as in nanoGPT.
        self.transformer.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper: each block adds two
        # branches (attn, mlp) to the residual stream, so the variance would grow with 2*n_layer otherwise
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

        logger.debug("number of parameters: %.2fM", self.get_num_params() / 1e6)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())  # parameters() yields the tied wte/lm_head once
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        With targets: logits (B, T, V) and the mean cross-entropy over targets != -1.
        Without: logits (B, 1, V) of the last position only (all generation needs), loss None.
        With a kv_cache: idx holds only the tokens the cache has not seen; they sit at positions after it.
        """
        device = idx.device
        b, t = idx.size()
        start = 0 if kv_cache is None else kv_cache.length
        if start + t > self.config.block_size:
            raise ValueError(
                f"Cannot forward sequence of length {start + t}, block size is only {self.config.block_size}"
            )
        pos = torch.arange(start, start + t, dtype=torch.long, device=device)  # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(t)

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)  # (b, t, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
            loss = None

        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Model surgery to decrease the block size if necessary, e.g. load the GPT-2 pretrained model
        checkpoint (block size 1024) but use a smaller block size for some smaller, simpler model."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in (0, {self.config.block_size}], got {block_size}")
        # a new config object: nanoGPT mutates it in place, which also changes the caller's config
        self.config = replace(self.config, block_size=block_size)
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with two groups: every 2D+ tensor (matmul weights, embeddings) decays, biases and
        LayerNorm gains (1D) do not. Fused AdamW on CUDA."""
        # start with all of the candidate parameters; named_parameters() yields the tied wte/lm_head once
        param_dict = {pn: p for pn, p in self.named_parameters() if p.requires_grad}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        logger.info("num decayed parameter tensors: %d, with %s parameters", len(decay_params), f"{num_decay_params:,}")
        logger.info(
            "num non-decayed parameter tensors: %d, with %s parameters",
            len(nodecay_params), f"{num_nodecay_params:,}",
        )
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        logger.info("using fused AdamW: %s", use_fused)
        return optimizer

    def flops_per_token(self) -> int:
        """Training (forward + backward) FLOPs per token at full context, from the PaLM paper Appendix B:
        https://arxiv.org/abs/2204.02311. 6N for the matmuls with weights, 12*L*H*Q*T for attention."""
        N = self.get_num_params()
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * N + 12 * L * H * Q * T

    def estimate_mfu(
        self,
        fwdbwd_per_iter: int,
        dt: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = torch.bfloat16,
    ) -> float | None:
        """Model FLOPs utilization: achieved FLOP/s over the device's dense peak for `dtype`, as a fraction.

        `fwdbwd_per_iter` sequences of block_size tokens took `dt` seconds. `device` defaults to the device of the
        parameters. Returns None on a CPU or a GPU missing from nanogpt.metrics' table (never a made-up number,
        unlike nanoGPT's fixed A100 figure). For fp32 training with TF32 matmuls on, pass dtype="tf32".
        """
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        if device is None:
            device = next(self.parameters()).device
        device = torch.device(device)
        if device.type != "cuda":
            return None
        peak = metrics.peak_flops(torch.cuda.get_device_name(device), dtype)
        return metrics.mfu(flops_per_iter, dt, peak)

    def new_kv_cache(self) -> KVCache:
        """An empty cache for `forward(..., kv_cache=)`, `next_token_logits` and `generate`."""
        return KVCache(self.config.n_layer, self.config.block_size)

    @torch.no_grad()
    def next_token_logits(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, V) for the token after idx (B, L), seeing at most the last block_size tokens (nanoGPT).

        With a cache, only the tokens it has not seen are forwarded. Once L > block_size the window slides and
        positions shift, so the window is recomputed from scratch, as uncached generation does.
        """
        block_size = self.config.block_size
        if kv_cache is None or idx.size(1) > block_size:
            # if the sequence context is growing too long we must crop it at block_size
            logits, _ = self(idx[:, -block_size:])
        else:
            if kv_cache.length >= idx.size(1):
                raise ValueError(f"the cache already holds {kv_cache.length} positions of a {idx.size(1)}-token idx")
            logits, _ = self(idx[:, kv_cache.length:], kv_cache=kv_cache)
        return logits[:, -1, :]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_samples: int = 1,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.

        Each row of idx is one sample; num_samples > 1 repeats every row that many times (rows
        [i*num_samples, (i+1)*num_samples) continue prompt i). temperature 0 is greedy (argmax). top_k keeps the k
        most likely tokens, top_p the smallest set whose probability reaches p (nucleus), applied in that order
        after the temperature. use_cache=False is nanoGPT's loop; both give the same tokens for the same
        `generator` state: they draw the same torch.multinomial calls from logits that agree to ~1e-6.
        Returns (b*num_samples, t+max_new_tokens).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if num_samples > 1:
            idx = idx.repeat_interleave(num_samples, dim=0)  # (b*num_samples, t)
        kv_cache = self.new_kv_cache() if use_cache else None
        with decode_layout(self) if use_cache else nullcontext():  # the weights as one-token steps read them best
            for _ in range(max_new_tokens):
                logits = self.next_token_logits(idx, kv_cache)  # (B, V)
                idx_next = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
                # append sampled index to the running sequence and continue
                idx = torch.cat((idx, idx_next), dim=1)
        return idx


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B, 1): temperature, then top-k, then top-p, then one multinomial draw.

    temperature 0 is argmax and draws nothing from the generator."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if temperature == 0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    # pluck the logits at the final step and scale by desired temperature
    logits = logits / temperature
    # optionally crop the logits to only the top k options
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens more likely than it already reach top_p; the most likely always stays
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    # apply softmax to convert logits to (normalized) probabilities
    probs = F.softmax(logits, dim=-1)
    # sample from the distribution
    return torch.multinomial(probs, num_samples=1, generator=generator)
