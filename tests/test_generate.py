"""KV-cached generation gives nanoGPT's tokens: same logits at every step, same samples for the same seed,
including once the sequence is longer than the block and nanoGPT's window slides (where PR #613 went wrong)."""

from __future__ import annotations

import pytest
import torch

from nanogpt.model import GPT, GPTConfig, sample_next_token

BLOCK = 16


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=64)).eval()


def nanogpt_generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """nanoGPT's generate loop, written out: crop to the block, full forward, sample, append."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = torch.nn.functional.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def prompt(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(7))


def both(model, idx, max_new_tokens, seed=1234, **kwargs):
    cached = model.generate(idx, max_new_tokens, use_cache=True, generator=torch.Generator().manual_seed(seed), **kwargs)
    uncached = model.generate(
        idx, max_new_tokens, use_cache=False, generator=torch.Generator().manual_seed(seed), **kwargs
    )
    return cached, uncached


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(temperature=0.7),
        dict(temperature=1.5, top_k=5),
        dict(top_p=0.8),
        dict(temperature=0.9, top_k=20, top_p=0.6),
        dict(temperature=0.0),
    ],
    ids=["plain", "temperature", "top_k", "top_p", "all", "greedy"],
)
def test_cached_equals_uncached_within_block(model, kwargs):
    cached, uncached = both(model, prompt(3, 5), 11, **kwargs)  # 5 + 11 = 16 = block: cache never invalid
    assert cached.shape == (3, 16)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("kwargs", [dict(), dict(top_k=10), dict(top_p=0.9), dict(temperature=0.0)])
def test_cached_equals_uncached_past_block(model, kwargs):
    # block 16, prompt 5, 40 new tokens: the window slides for the last 29 steps
    cached, uncached = both(model, prompt(2, 5), 40, **kwargs)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)


def test_prompt_longer_than_block(model):
    cached, uncached = both(model, prompt(2, 20), 8, top_k=10)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :20], prompt(2, 20))


def test_uncached_is_nanogpts_loop(model):
    idx = prompt(2, 5)
    ours = model.generate(idx, 30, temperature=0.8, top_k=10, use_cache=False, generator=torch.Generator().manual_seed(3))
    theirs = nanogpt_generate(model, idx, 30, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)


def test_cached_logits_match_uncached_at_every_step(model):
    # drive the two paths by hand over one sequence that runs 29 tokens past the block
    idx = prompt(2, 5)
    cache = model.new_kv_cache()
    g = torch.Generator().manual_seed(5)
    for step in range(40):
        cached = model.next_token_logits(idx, cache)  # (2, V)
        uncached = model.next_token_logits(idx)  # nanoGPT: full forward of idx[:, -block:]
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0, msg=f"step {step}")
        idx = torch.cat((idx, sample_next_token(uncached, generator=g)), dim=1)
    assert idx.size(1) == 45


def test_num_samples_repeats_each_prompt(model):
    idx = prompt(2, 4)
    out = model.generate(idx, 10, num_samples=3, top_k=20, generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 14)
    assert torch.equal(out[:3, :4], idx[[0, 0, 0]]) and torch.equal(out[3:, :4], idx[[1, 1, 1]])
    assert len({tuple(row.tolist()) for row in out[:3]}) == 3  # three different continuations of prompt 0
    cached, uncached = both(model, idx, 25, num_samples=3, top_p=0.9)
    assert torch.equal(cached, uncached)


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    idx = prompt(1, 4)
    a = model.generate(idx, 20, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 20, generator=torch.Generator().manual_seed(1))
    c = model.generate(idx, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_manual_attention_path_generates_the_same(model):
    idx = prompt(2, 5)
    flash, _ = both(model, idx, 30, top_k=10)
    for block in model.transformer.h:
        block.attn.flash = False
    try:
        manual_cached, manual_uncached = both(model, idx, 30, top_k=10)
    finally:
        for block in model.transformer.h:
            block.attn.flash = True
    assert torch.equal(manual_cached, manual_uncached)
    assert torch.equal(manual_cached, flash)


# Sampling rules on hand-made logits.

def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 4.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert sample_next_token(logits, temperature=0.0, generator=g).tolist() == [[1], [0]]
    assert torch.equal(g.get_state(), state)


def test_top_k_1_is_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    out = sample_next_token(logits, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), top_p=0.5 keeps {0}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, top_p=0.75, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_next_token(logits, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample_next_token(logits, top_p=1.0, generator=g).item() for _ in range(400)}
    assert draws == {0, 1, 2, 3}


def test_sampling_argument_errors():
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, top_p=0.0)


# ------------------------------------------------------------------------------------------ the decode layout


def _linear_weights(model: GPT) -> dict[str, torch.nn.Parameter]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_decode_layout_stores_linear_weights_column_major_for_the_block_and_restores_them():
    from nanogpt.weight_layout import decode_layout

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=64)).eval()
    before = {name: w.detach().clone() for name, w in _linear_weights(model).items()}
    params = _linear_weights(model)
    idx = prompt(2, 5)
    logits_before = model(idx)[0]
    with decode_layout(model):
        for name, w in _linear_weights(model).items():
            assert not w.is_contiguous() and w.t().is_contiguous() and torch.equal(w, before[name]), name
            assert w is params[name]  # the same Parameter: only its storage moved
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
        assert torch.allclose(model(idx)[0], logits_before, rtol=1e-5, atol=1e-6)  # the same model (sums may reorder)
    for name, w in _linear_weights(model).items():
        assert w.is_contiguous() and torch.equal(w, before[name]) and w is params[name], name
    assert all(t.is_contiguous() for t in model.state_dict().values())  # safetensors can save it again


def test_decode_layout_leaves_a_training_model_alone_and_restores_after_an_error():
    from nanogpt.weight_layout import decode_layout

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=64))
    with decode_layout(model.train()):
        assert all(w.is_contiguous() for w in _linear_weights(model).values())
    with pytest.raises(KeyboardInterrupt), decode_layout(model.eval()):
        assert not model.lm_head.weight.is_contiguous()
        raise KeyboardInterrupt
    assert all(w.is_contiguous() for w in _linear_weights(model).values())


def test_a_model_that_generated_under_inference_mode_trains_afterwards():
    """The storage put back after generation is made outside inference mode: autograd can use it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=64)).eval()
    with torch.inference_mode():
        model.generate(prompt(1, 3), 4, generator=torch.Generator().manual_seed(0))
    model.train()
    _, loss = model(prompt(2, 8), prompt(2, 8))
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.is_contiguous()
