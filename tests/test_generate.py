"""Tests of gpt/generate.py (sampling, KV-cache decoding, stop handling, streaming) and
of the `sample` stage, on tiny random models."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gpt.checkpoint import save_model
from gpt.config import build_config
from gpt.decoding import DecodePlan, _Matmuls, _onednn_linear_works
from gpt.generate import (
    SamplingParams,
    StopStringMatcher,
    apply_repetition_penalty,
    generate,
    generate_steps,
    sample_from_probs,
    sample_next,
    stream,
    top_k_filter,
    top_p_filter,
)
from gpt.model import GPT, KVCache, ModelConfig
from gpt.tokenizer import Tokenizer
from gptlab.sample import SEPARATOR, SampleConfig, parse_stop_strings, run

INF = float("inf")

TOKENIZER_LINES = [
    "Hello world, hello there.",
    "The rocket 🚀 flies to the moon 🌙.",
    "你好，世界！今天天气很好。",
    "Emoji party: 🎉🎉 and 👋 waves.",
    "Say END when done, then stop.",
] * 3


def tiny_model(layout: str = "gpt2", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    values = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=32)
    values.update(overrides)
    return GPT(ModelConfig.from_layout(layout, **values))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TOKENIZER_LINES, vocab_size=300)


class ScriptedGPT(GPT):
    """A real GPT whose logits are overwritten so that it continues the fixed sequence
    `script`: after the token at position p it predicts script[p + 1] (positions count
    real tokens, so left padding does not shift them)."""

    def __init__(self, config: ModelConfig, script: list[int]) -> None:
        super().__init__(config)
        self.script = script

    def forward(self, idx, targets=None, *, kv_cache=None, **kwargs):
        out = super().forward(idx, targets, kv_cache=kv_cache, **kwargs)
        if out.logits is None:
            return out
        T = out.logits.size(1)  # fewer than idx's columns when logits_to_keep is set
        positions = kv_cache.positions[:, kv_cache.length - T:kv_cache.length]  # (B, T)
        following = (positions + 1).clamp(max=len(self.script) - 1)
        forced = torch.tensor(self.script, device=idx.device)[following]
        logits = torch.full_like(out.logits, -10.0).scatter(2, forced[..., None], 10.0)
        return out._replace(logits=logits)


def scripted(tokenizer: Tokenizer, text: str, n_prompt: int = 1) -> tuple[ScriptedGPT, list[int]]:
    """A model that continues [eot] + encode(text); returns it and the first n_prompt ids as prompt."""
    return scripted_ids(tokenizer, [tokenizer.eot_id] + tokenizer.encode(text), n_prompt)


def scripted_ids(tokenizer: Tokenizer, script: list[int], n_prompt: int = 1) -> tuple[ScriptedGPT, list[int]]:
    config = ModelConfig.from_layout("gpt2", vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2,
                                     n_embd=16, block_size=128)
    torch.manual_seed(0)
    return ScriptedGPT(config, script), script[:n_prompt]


def greedy_without_cache(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Reference decoding: a full forward pass over the whole sequence for every token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if len(ids) >= model.config.block_size:
                break
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_new_tokens=20, temperature=0.0)
PROMPTS = [[5, 9, 2, 33, 17, 8, 41, 3, 60, 12, 7, 7, 1], [30, 4, 22], [11]]

# ---------------------------------------------------------------------------
# Processors against hand-worked numbers


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[0, 1, 1, -1]])  # token 1 twice, -1 is padding
    result = apply_repetition_penalty(logits, seen, 2.0)
    assert result.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_repetition_penalty_off_is_identity():
    logits = torch.randn(2, 5)
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0, 1], [2, 3]]), 1.0), logits)


def test_top_k_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert top_k_filter(logits, 2).tolist() == [[-INF, 3.0, 2.0, -INF]]


def test_top_k_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0]])
    assert top_k_filter(logits, 1).tolist() == [[-INF, 3.0, -INF, 3.0]]


def test_top_k_zero_is_off():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert torch.equal(top_k_filter(logits, 0), logits)


@pytest.mark.parametrize("p, kept", [(0.1, 1), (0.6, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_by_hand(p, kept):
    # probabilities 0.5, 0.3, 0.15, 0.05: the mass ranked above each token is 0, 0.5, 0.8, 0.95
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    result = top_p_filter(probs.log(), p)
    kept_ids = torch.isfinite(result[0]).nonzero().flatten().tolist()
    assert kept_ids == sorted([1, 3, 0, 2][:kept])


@pytest.mark.parametrize("u, token", [(0.0, 0), (0.05, 0), (0.0999, 0), (0.25, 1), (0.31, 2), (0.9999999, 2)])
def test_sample_from_probs_by_hand(u, token):
    # cumulative probabilities 0.1, 0.3, 1.0
    probs = torch.tensor([[0.1, 0.2, 0.7]])
    assert sample_from_probs(probs, torch.tensor([u])).tolist() == [token]


def test_sample_from_probs_skips_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]])
    assert sample_from_probs(probs, torch.tensor([0.0, 1.0 - 1e-12])).tolist() == [1, 2]


def test_temperature_by_hand():
    # probabilities 0.25, 0.75; at temperature 2 they become 1/(1+sqrt 3) = 0.366 and 0.634
    logits = torch.tensor([[0.0, math.log(3.0)]])
    uniform = torch.tensor([0.3])
    at_1 = sample_next(logits, None, SamplingParams(temperature=1.0), uniforms=uniform)
    at_2 = sample_next(logits, None, SamplingParams(temperature=2.0), uniforms=uniform)
    assert at_1.tolist() == [1]
    assert at_2.tolist() == [0]


def test_greedy_applies_penalty():
    logits = torch.tensor([[2.0, 1.5, -1.0]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, None, params).tolist() == [0]
    assert sample_next(logits, torch.tensor([[0]]), params).tolist() == [1]


# ---------------------------------------------------------------------------
# Processors against transformers on the same logits


@pytest.fixture
def random_scores():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 50, generator=generator) * 3
    input_ids = torch.randint(0, 50, (4, 12), generator=generator)
    return scores, input_ids


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(random_scores, penalty):
    scores, input_ids = random_scores
    expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, scores.clone())
    assert torch.allclose(apply_repetition_penalty(scores, input_ids, penalty), expected)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(random_scores, k):
    scores, input_ids = random_scores
    expected = TopKLogitsWarper(k)(input_ids, scores.clone())
    assert torch.equal(top_k_filter(scores, k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(random_scores, p):
    scores, input_ids = random_scores
    expected = TopPLogitsWarper(p)(input_ids, scores.clone())
    assert torch.equal(top_p_filter(scores, p), expected)


# ---------------------------------------------------------------------------
# Parameters


def test_params_problems_list_each_field():
    params = SamplingParams(max_new_tokens=0, temperature=-1, top_k=-2, top_p=0.0, repetition_penalty=0.0,
                            stop=[""], stop_token_ids=[-1])
    text = "\n".join(params.problems())
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "stop strings",
                 "stop_token_ids"):
        assert name in text


def test_default_params_are_valid():
    assert SamplingParams().problems() == []


def test_generate_rejects_invalid_params():
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model(), [[1]], SamplingParams(top_p=1.5))


# ---------------------------------------------------------------------------
# KV-cache decoding against full recomputation


@pytest.mark.parametrize("pos_encoding", ["learned", "rope", "alibi"])
def test_cache_matches_no_cache(pos_encoding):
    model = tiny_model("gpt2", pos_encoding=pos_encoding).eval()
    prompt = PROMPTS[0]
    completion = generate(model, [prompt], GREEDY)[0]
    assert completion.tokens == greedy_without_cache(model, prompt, GREEDY.max_new_tokens)


@pytest.mark.parametrize("layout, overrides", [
    ("gpt2", {}),
    ("llama", {}),
    ("llama", {"n_kv_head": 2}),
    ("llama", {"n_kv_head": 1}),
    ("gpt2", {"pos_encoding": "alibi"}),
])
def test_batch_matches_each_alone(layout, overrides):
    model = tiny_model(layout, **overrides)
    batched = generate(model, PROMPTS, GREEDY)
    for prompt, completion in zip(PROMPTS, batched):
        alone = generate(model, [prompt], GREEDY)[0]
        assert completion.tokens == alone.tokens


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_batch_matches_no_cache_up_to_block_size(layout):
    # block_size 20: the 13-token prompt finishes after 7 tokens, the others keep going, so the
    # cache must drop the finished row and its padding columns to stay within block_size.
    model = tiny_model(layout, block_size=20)
    params = SamplingParams(max_new_tokens=100, temperature=0.0)
    batched = generate(model, PROMPTS, params)
    for prompt, completion in zip(PROMPTS, batched):
        assert completion.tokens == greedy_without_cache(model, prompt, 100)
        assert len(prompt) + len(completion.tokens) == 20
        assert completion.finish_reason == "length"


def test_prompt_filling_block_size_rejected():
    model = tiny_model(block_size=8)
    with pytest.raises(ValueError, match=r"prompt 1 has 8 tokens but the model's block_size is 8"):
        generate(model, [[1, 2], list(range(8))], GREEDY)


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(tiny_model(), [[]], GREEDY)


def test_out_of_vocabulary_prompt_rejected():
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(tiny_model(), [[1, 64]], GREEDY)


def test_generation_restores_training_mode():
    model = tiny_model().train()
    generate(model, [[1, 2]], GREEDY)
    assert model.training


def test_bfloat16_autocast_runs():
    model = tiny_model("llama", n_kv_head=2)
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    completions = generate(model, PROMPTS, params, dtype=torch.bfloat16)
    assert [len(c.tokens) for c in completions] == [10, 10, 10]


def test_max_new_tokens_gives_length():
    completion = generate(tiny_model(), [[1, 2, 3]], SamplingParams(max_new_tokens=5, temperature=0.0))[0]
    assert len(completion.tokens) == 5
    assert completion.finish_reason == "length"


# ---------------------------------------------------------------------------
# The one-token decoding step (gpt/decoding.py) against GPT.forward's general path

DECODE_CASES = {
    "learned": ("gpt2", {}),
    "rope": ("gpt2", {"pos_encoding": "rope"}),
    "alibi": ("gpt2", {"pos_encoding": "alibi"}),
    "none": ("gpt2", {"pos_encoding": "none"}),
    "no_bias_untied": ("gpt2", {"bias": False, "tie_embeddings": False}),
    "llama_gqa": ("llama", {"n_kv_head": 2}),
    "llama_mqa_qk_norm": ("llama", {"n_kv_head": 1, "qk_norm": True}),
    "window_rope": ("llama", {"sliding_window": 5}),
    "window_alibi": ("gpt2", {"pos_encoding": "alibi", "sliding_window": 5}),
}


def randomized(model: GPT, seed: int = 0) -> GPT:
    """Redraw every weight with a larger spread (norm weights near 1), so that logits differ
    by more than the tolerance between positions and a wrong mask or position shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(1.0 + 0.3 * noise if is_norm_weight else 0.2 * noise)
    return model.eval()


def ragged_batch(kind: str = "ragged") -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Return (3, 9) prompts left-padded to 9, 5 and 2 real tokens, their mask, and (3, 8)
    tokens to feed after them. Kind "unpadded" drops the padding, and "single" keeps the first row only."""
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(1, 64, (3, 9), generator=generator)
    new_tokens = torch.randint(1, 64, (3, 8), generator=generator)
    if kind == "single":
        return idx[:1], None, new_tokens[:1]
    if kind == "unpadded":
        return idx, None, new_tokens
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return idx, mask, new_tokens


def general_step(model: GPT, idx: torch.Tensor, **kwargs):
    """GPT.forward's general path for a call that would take the one-token step: the step
    requires gradients off, so the same call runs with them on."""
    with torch.enable_grad():
        out = model(idx, **kwargs)
    return out._replace(logits=out.logits.detach())


def cached_logits(model: GPT, idx, mask, new_tokens, general: bool = False, max_length: int | None = None,
                  position_ids: torch.Tensor | None = None, **cache_args):
    """Prefill `idx`, then feed `new_tokens` one column at a time. Return the (B, n + 1, V)
    logits after the prompt and after each token, and the cache. With `general`, the steps
    run through GPT.forward's general path (see `general_step`)."""
    B = idx.size(0)
    cache = KVCache(model.config, B, max_length or idx.size(1) + new_tokens.size(1), **cache_args)
    steps = [model(idx, attention_mask=mask, position_ids=position_ids, kv_cache=cache).logits[:, -1]]
    for t in range(new_tokens.size(1)):
        token = new_tokens[:, t:t + 1]
        out = general_step(model, token, kv_cache=cache) if general else model(token, kv_cache=cache)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1), cache


def uncached_logits(model: GPT, idx, mask, new_tokens) -> torch.Tensor:
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(new_tokens)], dim=1)
    return model(torch.cat([idx, new_tokens], dim=1), attention_mask=full_mask).logits[:, idx.size(1) - 1:]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("batch", ["ragged", "unpadded", "single"])
@pytest.mark.parametrize("case", list(DECODE_CASES))
@torch.no_grad()
def test_decode_step_matches_forward(case, batch):
    layout, overrides = DECODE_CASES[case]
    model = randomized(tiny_model(layout, **overrides))
    idx, mask, new_tokens = ragged_batch(batch)

    fast, cache = cached_logits(model, idx, mask, new_tokens)
    general, _ = cached_logits(model, idx, mask, new_tokens, general=True)
    uncached = uncached_logits(model, idx, mask, new_tokens)

    assert isinstance(cache.decode_plan, DecodePlan)  # the steps took the fast path
    assert uncached.std() > 0.5  # logits large enough for the tolerance to mean something
    assert max_diff(fast, general) < 1e-5
    assert max_diff(fast, uncached) < 1e-4


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_matmul_forms_match_linear(rows, dtype, bias):
    generator = torch.Generator().manual_seed(0)
    for out_features, in_features in ((48, 16), (16, 48)):  # a wide and a tall matrix take different forms
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        result = _Matmuls(rows, autocast_dtype=None).matmul(weight, b)(x)
        torch.testing.assert_close(result, F.linear(x, weight, b))


@pytest.mark.parametrize("rows", [1, 3])
@torch.inference_mode()
def test_matmul_forms_match_linear_under_autocast(rows):
    generator = torch.Generator().manual_seed(0)
    weight, b, x = (torch.randn(shape, generator=generator) for shape in ((48, 16), (48,), (rows, 16)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight, b)
        result = _Matmuls(rows, autocast_dtype=torch.bfloat16).matmul(weight, b)(x)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result, expected)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_linear_in_use():
    # Without it, decoding several rows on a CPU falls back to a slower product, silently.
    assert _onednn_linear_works()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_onednn_check_inside_autocast():
    # A training stage's first generation can run under bfloat16 autocast.
    _onednn_linear_works.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _onednn_linear_works()
    finally:
        _onednn_linear_works.cache_clear()


@torch.no_grad()
def test_decode_step_without_onednn(monkeypatch):
    monkeypatch.setattr("gpt.decoding._onednn_linear_works", lambda: False)
    model = randomized(tiny_model("llama", n_kv_head=2))
    idx, mask, new_tokens = ragged_batch()
    fast, cache = cached_logits(model, idx, mask, new_tokens)
    general, _ = cached_logits(model, idx, mask, new_tokens, general=True)
    assert isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast, general) < 1e-5


@pytest.mark.parametrize("batch", ["ragged", "single"])
@torch.no_grad()
def test_decode_step_bfloat16_weights(batch):
    model = randomized(tiny_model("llama", n_kv_head=2)).to(torch.bfloat16)
    idx, mask, new_tokens = ragged_batch(batch)
    fast, cache = cached_logits(model, idx, mask, new_tokens, dtype=torch.bfloat16)
    general, _ = cached_logits(model, idx, mask, new_tokens, general=True, dtype=torch.bfloat16)
    scale = general.abs().max().item()
    assert isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast.float(), general.float()) < 0.02 * scale


@torch.no_grad()
def test_decode_step_under_autocast():
    """Steps under bfloat16 autocast match the general path under autocast; a step after
    autocast ends rebuilds the plan and matches the float32 general path."""
    model = randomized(tiny_model("gpt2"))
    idx, mask, new_tokens = ragged_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, cache = cached_logits(model, idx, mask, new_tokens[:, :7], max_length=17)
        general, general_cache = cached_logits(model, idx, mask, new_tokens[:, :7], general=True, max_length=17)
    scale = general.abs().max().item()
    assert cache.decode_plan.autocast == torch.bfloat16
    assert max_diff(fast.float(), general.float()) < 0.02 * scale

    last = new_tokens[:, 7:]
    fast_last = model(last, kv_cache=cache).logits
    general_last = general_step(model, last, kv_cache=general_cache).logits
    assert cache.decode_plan.autocast is None
    assert fast_last.dtype == torch.float32
    assert max_diff(fast_last, general_last) < 1e-5


@torch.no_grad()
def test_decode_step_bfloat16_cache():
    model = randomized(tiny_model("llama", n_kv_head=2))
    idx, mask, new_tokens = ragged_batch()
    fast, cache = cached_logits(model, idx, mask, new_tokens, dtype=torch.bfloat16)
    general, _ = cached_logits(model, idx, mask, new_tokens, general=True, dtype=torch.bfloat16)
    # Both round the same keys and values to bfloat16, up to a rounding step where the
    # fused q/k/v matmul and the separate ones differ in the last float32 bit.
    assert cache.keys.dtype == torch.bfloat16
    assert isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast, general) < 1e-2


@pytest.mark.parametrize("batch", ["ragged", "unpadded"])
@torch.no_grad()
def test_decode_step_after_given_positions(batch):
    """After a prefill with positions given by the caller, the steps number the new tokens as
    GPT.forward does: by counting real tokens when the prefill had a mask, else from the last position."""
    model = randomized(tiny_model("gpt2", pos_encoding="rope"))
    idx, mask, new_tokens = ragged_batch(batch)
    positions = torch.arange(idx.size(1)).expand(idx.size(0), -1) + 5
    fast, cache = cached_logits(model, idx, mask, new_tokens, position_ids=positions)
    general, _ = cached_logits(model, idx, mask, new_tokens, general=True, position_ids=positions)
    assert isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast, general) < 1e-5


@pytest.mark.parametrize("batch", ["ragged", "unpadded"])
@torch.no_grad()
def test_decode_step_after_general_append(batch):
    """Fast steps, then three tokens at once through the general path, with a padding column
    in one row, then fast steps again: they must mask that column and not count it."""
    model = randomized(tiny_model("gpt2", pos_encoding="alibi", sliding_window=6))
    idx, mask, new_tokens = ragged_batch(batch)
    B, P = idx.shape
    append_mask = torch.ones(B, 3, dtype=torch.long)
    append_mask[1, 0] = 0
    cache = KVCache(model.config, B, P + new_tokens.size(1))
    steps = [model(idx, attention_mask=mask, kv_cache=cache).logits[:, -1]]
    for t in range(3):
        steps.append(model(new_tokens[:, t:t + 1], kv_cache=cache).logits[:, -1])
    steps.append(model(new_tokens[:, 3:6], attention_mask=append_mask, kv_cache=cache).logits[:, -1])
    for t in range(6, 8):
        steps.append(model(new_tokens[:, t:t + 1], kv_cache=cache).logits[:, -1])

    prompt_mask = mask if mask is not None else torch.ones(B, P, dtype=torch.long)
    full_mask = torch.cat([prompt_mask, torch.ones(B, 3, dtype=torch.long), append_mask,
                           torch.ones(B, 2, dtype=torch.long)], dim=1)
    full = model(torch.cat([idx, new_tokens], dim=1), attention_mask=full_mask).logits
    expected = full[:, [P - 1, P, P + 1, P + 2, P + 5, P + 6, P + 7]]
    assert max_diff(torch.stack(steps, dim=1), expected) < 1e-4


@torch.no_grad()
def test_decode_step_after_trim():
    """Rows that are all left-padded: trimming the shared padding columns mid-decode."""
    model = randomized(tiny_model("llama", sliding_window=5))
    idx, mask, new_tokens = ragged_batch()
    idx, mask, new_tokens = idx[1:], mask[1:], new_tokens[1:]  # 4 and 7 padding columns: 4 are shared
    cache = KVCache(model.config, 2, idx.size(1) + new_tokens.size(1))
    steps = [model(idx, attention_mask=mask, kv_cache=cache).logits[:, -1]]
    for t in range(3):
        steps.append(model(new_tokens[:, t:t + 1], kv_cache=cache).logits[:, -1])
    cache.trim_left()
    for t in range(3, 8):
        steps.append(model(new_tokens[:, t:t + 1], kv_cache=cache).logits[:, -1])
    assert cache.length == idx.size(1) + new_tokens.size(1) - 4
    assert max_diff(torch.stack(steps, dim=1), uncached_logits(model, idx, mask, new_tokens)) < 1e-4


@torch.no_grad()
def test_decode_step_after_reorder():
    model = randomized(tiny_model("llama", n_kv_head=2))
    idx, mask, new_tokens = ragged_batch()
    B = idx.size(0)
    cache = KVCache(model.config, B, idx.size(1) + new_tokens.size(1))
    model(idx, attention_mask=mask, kv_cache=cache)
    for t in range(3):
        model(new_tokens[:, t:t + 1], kv_cache=cache)
    keep = torch.tensor([1, 2])  # the longest row leaves, so the leading padding column goes too
    cache.reorder(keep)
    cache.trim_left()
    steps = [model(new_tokens[keep, t:t + 1], kv_cache=cache).logits[:, -1] for t in range(3, 8)]
    expected = uncached_logits(model, idx[keep], mask[keep], new_tokens[keep])[:, 4:]
    assert cache.length == idx.size(1) + new_tokens.size(1) - 4
    assert max_diff(torch.stack(steps, dim=1), expected) < 1e-4


@torch.no_grad()
def test_decode_step_applies_lora():
    from gpt.lora import add_lora

    model = randomized(tiny_model("llama", n_kv_head=2))
    idx, mask, new_tokens = ragged_batch()
    plain, _ = cached_logits(model, idx, mask, new_tokens)
    adapted = add_lora(model, r=4, alpha=8.0, dropout=0.0, targets="q_proj,v_proj,up_proj")
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    gpt = adapted.get_base_model().eval()

    fast, cache = cached_logits(gpt, idx, mask, new_tokens)
    general, _ = cached_logits(gpt, idx, mask, new_tokens, general=True)

    assert isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast, plain) > 0.1  # the adapters change the logits
    assert max_diff(fast, general) < 1e-5


@torch.no_grad()
def test_decode_step_runs_module_hooks():
    model = randomized(tiny_model())
    idx, _, new_tokens = ragged_batch("unpadded")
    calls = []
    model.blocks[1].mlp.up_proj.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    cached_logits(model, idx, None, new_tokens)
    assert len(calls) == 1 + new_tokens.size(1)  # the prefill, then every step


@torch.no_grad()
def test_decode_step_leaves_hooked_block_to_forward():
    model = randomized(tiny_model())
    idx, mask, new_tokens = ragged_batch()
    model.blocks[0].register_forward_hook(lambda module, args, out: out * 2)
    fast, cache = cached_logits(model, idx, mask, new_tokens)
    uncached = uncached_logits(model, idx, mask, new_tokens)
    assert not isinstance(cache.decode_plan, DecodePlan)
    assert max_diff(fast, uncached) < 1e-4


def test_decode_step_not_with_gradients():
    model = tiny_model().eval()
    cache = KVCache(model.config, 1, 4)
    model(torch.tensor([[1, 2]]), kv_cache=cache)
    model(torch.tensor([[3]]), kv_cache=cache)
    assert cache.decode_plan is None


@pytest.mark.parametrize("layout, overrides", [
    ("gpt2", {"pos_encoding": "none"}),
    ("llama", {"sliding_window": 4}),
    ("gpt2", {"pos_encoding": "alibi", "sliding_window": 4}),
    ("llama", {"qk_norm": True, "n_kv_head": 1}),
])
def test_generate_matches_no_cache_variations(layout, overrides):
    model = tiny_model(layout, **overrides)
    batched = generate(model, PROMPTS, GREEDY)
    for prompt, completion in zip(PROMPTS, batched):
        assert completion.tokens == greedy_without_cache(model, prompt, GREEDY.max_new_tokens)


def test_generate_decodes_with_fast_step(monkeypatch):
    calls = []
    step = DecodePlan.step

    def counted(plan, *args, **kwargs):
        calls.append(plan)
        return step(plan, *args, **kwargs)

    monkeypatch.setattr(DecodePlan, "step", counted)
    generate(tiny_model(), PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0, stop_token_ids=[]))
    assert len(calls) == 4  # every token after the first, which the prefill gives


# ---------------------------------------------------------------------------
# Seeds


def sampled(model: GPT, seed: int, prompts=PROMPTS) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=seed)
    return [c.tokens for c in generate(model, prompts, params)]


def test_same_seed_same_output():
    model = tiny_model()
    assert sampled(model, 7) == sampled(model, 7)


def test_different_seeds_differ():
    model = tiny_model()
    assert sampled(model, 7) != sampled(model, 8)


def test_row_draws_independent_of_other_rows():
    # Row 0 of the first batch finishes early (block_size), row 0 of the second does not;
    # row 1 draws the same numbers either way.
    model = tiny_model(block_size=20)
    params = SamplingParams(max_new_tokens=15, temperature=1.0, seed=3)
    early = generate(model, [PROMPTS[0], PROMPTS[1]], params)
    late = generate(model, [PROMPTS[2], PROMPTS[1]], params)
    assert len(early[0].tokens) < len(late[0].tokens)
    assert early[1].tokens == late[1].tokens


def test_sampling_respects_top_k_one():
    model = tiny_model()
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=0)
    assert generate(model, [PROMPTS[1]], params)[0].tokens == generate(model, [PROMPTS[1]], GREEDY)[0].tokens[:10]


# ---------------------------------------------------------------------------
# Stop ids, stop strings and streaming


def test_stop_token_ends_row(tokenizer):
    # encode() never produces special tokens, so the end-of-text id is put in by hand.
    before = tokenizer.encode("Hello world")
    script = [tokenizer.eot_id, *before, tokenizer.eot_id, *tokenizer.encode("more text")]
    model, prompt = scripted_ids(tokenizer, script)
    completion = generate(model, [prompt], SamplingParams(max_new_tokens=50, temperature=0.0), tokenizer=tokenizer)[0]
    assert completion.finish_reason == "stop"
    assert completion.text == "Hello world"
    assert completion.tokens[-1] == tokenizer.eot_id
    assert len(completion.tokens) == len(before) + 1


def test_custom_stop_token_id(tokenizer):
    model, prompt = scripted(tokenizer, "Hello, world")
    comma = tokenizer.encode(",")[0]
    params = SamplingParams(max_new_tokens=50, temperature=0.0, stop_token_ids=[comma])
    completion = generate(model, [prompt], params, tokenizer=tokenizer)[0]
    assert completion.text == "Hello"
    assert completion.finish_reason == "stop"


def test_stop_string_spanning_tokens(tokenizer):
    model, prompt = scripted(tokenizer, "Say hi. ZQX then more words")
    assert len(tokenizer.encode(" ZQX")) > 1  # the stop string spans several tokens
    params = SamplingParams(max_new_tokens=50, temperature=0.0, stop=[" ZQX"])
    text_stream = stream(model, tokenizer, prompt, params)
    pieces = list(text_stream)
    assert "".join(pieces) == "Say hi."
    assert all("Z" not in piece for piece in pieces)
    assert text_stream.finish_reason == "stop"
    assert tokenizer.decode(text_stream.tokens) == "Say hi. ZQX"


def test_partial_stop_string_released(tokenizer):
    # "ZQ" starts the stop string but "ZQ " does not continue it, so it is shown after all.
    model, prompt = scripted(tokenizer, "a ZQ b ZQX c")
    params = SamplingParams(max_new_tokens=50, temperature=0.0, stop=["ZQX"])
    assert "".join(stream(model, tokenizer, prompt, params)) == "a ZQ b "


def test_held_text_released_at_length(tokenizer):
    model, prompt = scripted(tokenizer, "one two ZQ")
    n_tokens = len(tokenizer.encode("one two ZQ"))
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.0, stop=["ZQX"])
    text_stream = stream(model, tokenizer, prompt, params)
    assert "".join(text_stream) == "one two ZQ"
    assert text_stream.finish_reason == "length"


def test_stop_string_inside_multibyte_text(tokenizer):
    model, prompt = scripted(tokenizer, "你好，世界！今天")
    params = SamplingParams(max_new_tokens=50, temperature=0.0, stop=["世界"])
    completion = generate(model, [prompt], params, tokenizer=tokenizer)[0]
    assert completion.text == "你好，"
    assert completion.finish_reason == "stop"


def test_batch_rows_stop_independently(tokenizer):
    model, _ = scripted(tokenizer, "alpha beta. gamma delta epsilon")
    script = model.script
    # The second row starts after the period, in the same text.
    prompts = [script[:1], script[:1 + len(tokenizer.encode("alpha beta."))]]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop=["."])
    first, second = generate(model, prompts, params, tokenizer=tokenizer)
    assert first.finish_reason == "stop"
    assert first.text == "alpha beta"
    assert second.finish_reason == "length"
    assert "." not in second.text


def test_stream_pieces_are_whole_characters(tokenizer):
    text = "Hello 👋 世界, the rocket 🚀 flies 🎉🎉 今天天气很好"
    model, prompt = scripted(tokenizer, text)
    ids = tokenizer.encode(text)
    # Check the premise: some tokens hold only part of a character.
    partial = [i for i in ids if not _is_utf8(tokenizer.token_bytes(i))]
    assert partial
    params = SamplingParams(max_new_tokens=len(ids), temperature=0.0)
    pieces = list(stream(model, tokenizer, prompt, params))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 1


def test_stream_equals_generate(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=5, stop=["e"])
    prompt = [tokenizer.eot_id] + tokenizer.encode("Hello")
    text_stream = stream(model, tokenizer, prompt, params)
    text = "".join(text_stream)
    completion = generate(model, [prompt], params, tokenizer=tokenizer)[0]
    assert text == completion.text
    assert text_stream.tokens == completion.tokens


def test_stream_validates_at_call(tokenizer):
    with pytest.raises(ValueError, match="temperature"):
        stream(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, [1], SamplingParams(temperature=-1.0))


def test_stop_strings_need_tokenizer():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        generate_steps(tiny_model(), [[1]], SamplingParams(stop=["x"]))


def test_padded_vocabulary_never_sampled(tokenizer):
    # A model with 64 ids beyond the tokenizer's vocabulary, biased towards them.
    model = tiny_model(vocab_size=tokenizer.vocab_size + 64)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.vocab_size:] *= 50
    params = SamplingParams(max_new_tokens=40, temperature=2.0, seed=0, stop_token_ids=[])
    completion = generate(model, [[tokenizer.eot_id]], params, tokenizer=tokenizer)[0]
    assert max(completion.tokens) < tokenizer.vocab_size


def test_matcher_holds_longest_prefix():
    matcher = StopStringMatcher(["abc", "bd"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("d") == ("a", True)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------
# The sample stage


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer_file = folder / "source_tokenizer.json"
    tokenizer.save(tokenizer_file)
    model = tiny_model("llama", vocab_size=tokenizer.vocab_size, block_size=48)
    save_model(model, folder, tokenizer_file=tokenizer_file)
    return folder


def run_sample_stage(args: list[str]) -> None:
    """Run `gptlab sample ARGS` through the CLI when it exists, else through build_config and run."""
    if importlib.util.find_spec("gptlab.cli") is not None:
        from gptlab.cli import main

        main(["sample", *args])
    else:
        run(build_config(SampleConfig, overrides=[arg.split("=", 1) for arg in args]))


def test_sample_stage_end_to_end(checkpoint, capsys):
    run_sample_stage([f"checkpoint={checkpoint}", "prompt=Hello", "num_samples=2", "max_new_tokens=10"])
    out = capsys.readouterr().out
    samples = out.split(f"\n{SEPARATOR}\n")
    assert len(samples) == 3  # two samples, each followed by a separator
    assert samples[0].startswith("Hello")
    assert samples[1].startswith("Hello")


def test_sample_stage_is_reproducible(checkpoint, capsys):
    cfg = SampleConfig(checkpoint=checkpoint, num_samples=2, max_new_tokens=12)
    first = run(cfg)
    second = run(cfg)
    capsys.readouterr()
    assert first == second
    assert first[0] != first[1]  # sample k uses seed + k


def test_sample_stage_missing_files(tmp_path):
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors, tokenizer.json"):
        run(SampleConfig(checkpoint=tmp_path))


def test_sample_stage_prompt_too_long(checkpoint):
    with pytest.raises(ValueError, match=r"tokens long .* block_size is 48"):
        run(SampleConfig(checkpoint=checkpoint, prompt="hello there " * 40))


def test_parse_stop_strings():
    assert parse_stop_strings(r"\n\n,END,a\,b,,\\") == ["\n\n", "END", "a,b", "\\"]
    assert parse_stop_strings("") == []
    assert parse_stop_strings([" x", "y"]) == [" x", "y"]


def test_prefill_one_forward_pass():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=64)).eval()
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    generate(model, [[0, 5, 6, 7]], SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=[]))
    hook.remove()
    assert shapes == [(1, 4)]
