"""Log-likelihood scoring of evals/scoring.py against references computed here by plain loops,
and against the same weights run in `transformers`.

The tiny models have random weights drawn wider than the default initialization, so
that their next-token distributions are far from uniform and a scoring error (an
off-by-one position, a context token scored, padding attended) changes the numbers.
"""

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.scoring import (
    ContinuationScore,
    encode_pair,
    predict_choices,
    score_continuations,
    token_nlls,
    window_plan,
)
from gpt.hf import to_hf_model
from gpt.model import GPT, ModelConfig
from gpt.tokenizer import Tokenizer

DATA_DIR = os.environ.get("GPTLAB_DATA_DIR")
pytestmark = pytest.mark.skipif(not DATA_DIR, reason="GPTLAB_DATA_DIR is not set; it points to the data kit")

BLOCK_SIZE = 24


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = Path(DATA_DIR) / "pretrain/tinystories/tinystories_train_prefix.txt.gz"
    text = gzip.open(path, "rt", encoding="utf-8").read()[:60_000]
    return Tokenizer.train(text.split("\n\n"), vocab_size=400)


def random_model(layout: str, vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig.from_layout(layout, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=32,
                                     block_size=BLOCK_SIZE)
    model = GPT(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> GPT:
    return random_model("gpt2", tokenizer.vocab_size)


def loop_logprob(model, context: list[int], continuation: list[int], block_size: int = BLOCK_SIZE) -> float:
    """Sum of log-softmax of the continuation's tokens, one unpadded forward pass per token.

    Continuation token t belongs to chunk k = (t - len(context)) // block_size and sees the
    block_size tokens before the chunk's last token, or all there are. `model` is ours or
    a transformers model: both return an output with .logits.
    """
    ids = context + continuation
    a, L = len(context), block_size
    total = 0.0
    with torch.no_grad():
        for t in range(a, len(ids)):
            b = min(a + ((t - a) // L + 1) * L, len(ids))
            logits = model(torch.tensor([ids[max(0, b - 1 - L):t]])).logits[0, -1]
            total += F.log_softmax(logits.double(), dim=-1)[ids[t]].item()
    return total


# ---------------------------------------------------------------------------------------------
# The tokenization rule


def test_encode_pair_moves_whitespace(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "Paris")
    assert context_ids == [tokenizer.eot_id] + tokenizer.encode("Answer:")
    assert continuation_ids == tokenizer.encode(" Paris")


def test_encode_pair_empty_context(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "", "The cat sat.")
    assert context_ids == [tokenizer.eot_id]
    assert continuation_ids == tokenizer.encode("The cat sat.")


def test_encode_pair_merge_across_join(tokenizer):
    context, continuation = "Once upon a ti", "me"
    joined = tokenizer.encode(context + continuation)
    separate = tokenizer.encode(context) + tokenizer.encode(continuation)
    assert joined != separate, "the example must merge a token across the join"
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    assert continuation_ids == tokenizer.encode("me")
    assert context_ids[1:] == tokenizer.encode(context)
    assert tokenizer.decode(continuation_ids) == "me"


def test_encode_pair_empty_continuation(tokenizer):
    with pytest.raises(ValueError, match="empty continuation"):
        encode_pair(tokenizer, "Question:", "")


# ---------------------------------------------------------------------------------------------
# Continuation scores


PAIRS = [
    ("Once upon a ti", "me"),  # a token merges across the join
    ("Answer: ", "Paris"),
    ("", "Lily liked to play."),
    ("Tom saw a dog", " and a cat"),
    # Longer than block_size + 1 tokens: the context loses tokens from the left.
    ("Once upon a time there was a little girl named Lily who loved to play in the park with her dog", " Max"),
    # A continuation longer than block_size: scored in two chunks.
    ("Lily", " and her mom went to the big park. They saw a duck in the pond, and the duck said quack to them."),
]


def test_scores_match_loop(tokenizer, model):
    encoded = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    scores = score_continuations(model, encoded, batch_size=3, pad_id=tokenizer.pad_id)
    for (context_ids, continuation_ids), score in zip(encoded, scores):
        assert score.n_tokens == len(continuation_ids)
        assert score.logprob == pytest.approx(loop_logprob(model, context_ids, continuation_ids), abs=1e-4)


def test_scores_truncated_flag(tokenizer, model):
    encoded = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    scores = score_continuations(model, encoded, batch_size=2)
    assert [s.truncated for s in scores] == [False, False, False, False, True, True]


def test_scores_independent_of_batch(tokenizer, model):
    encoded = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    one_by_one = [score_continuations(model, [pair])[0].logprob for pair in encoded]
    batched = [s.logprob for s in score_continuations(model, encoded, batch_size=len(encoded), pad_id=7)]
    assert batched == pytest.approx(one_by_one, abs=1e-4)


def test_is_greedy(tokenizer, model):
    context = [tokenizer.eot_id] + tokenizer.encode("Once upon a time")
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            greedy.append(int(model(torch.tensor([context + greedy])).logits[0, -1].argmax()))
    other = greedy[:2] + [(greedy[2] + 1) % tokenizer.vocab_size]
    scores = score_continuations(model, [(context, greedy), (context, other)])
    assert scores[0].is_greedy
    assert not scores[1].is_greedy


def test_long_continuation_in_chunks(tokenizer, model):
    context_ids, continuation_ids = encode_pair(tokenizer, *PAIRS[-1])
    assert len(continuation_ids) > BLOCK_SIZE
    (score,) = score_continuations(model, [(context_ids, continuation_ids)])
    assert score.n_tokens == len(continuation_ids)
    assert score.truncated


# ---------------------------------------------------------------------------------------------
# Length normalizations


def test_length_normalizations_hand_worked():
    # "Zürich" is 7 UTF-8 bytes (ü takes two); the delimiter is not counted.
    scores = [ContinuationScore(-10.0, False, 4), ContinuationScore(-9.0, False, 2),
              ContinuationScore(-12.6, False, 3)]
    predictions = predict_choices([["Paris", "Rome", "Zürich"]], scores)
    # Raw: -10, -9, -12.6 -> Rome.
    assert predictions["acc"] == [1]
    # Per byte: -10/5 = -2.0, -9/4 = -2.25, -12.6/7 = -1.8 -> Zürich.
    assert predictions["acc_norm"] == [2]
    # Per token: -10/4 = -2.5, -9/2 = -4.5, -12.6/3 = -4.2 -> Paris.
    assert predictions["acc_per_token"] == [0]


# ---------------------------------------------------------------------------------------------
# Sliding-window perplexity


def brute_force_nlls(model: GPT, tokens: list[int], stride: int) -> np.ndarray:
    """Token t is scored by the first window that reaches it: window k starts at k * stride
    and covers targets up to k * stride + block_size, so its context is tokens[k * stride:t]."""
    L = model.config.block_size
    nlls = []
    with torch.no_grad():
        for t in range(1, len(tokens)):
            k = max(0, math.ceil((t - L) / stride))
            logits = model(torch.tensor([tokens[k * stride:t]])).logits[0, -1]
            nlls.append(-F.log_softmax(logits.double(), dim=-1)[tokens[t]].item())
    return np.array(nlls)


@pytest.mark.parametrize("stride", [1, 5, 7, BLOCK_SIZE])
def test_sliding_window_matches_brute_force(tokenizer, model, stride):
    text = ("Once upon a time, there was a little boy named Tim. Tim liked to run and jump in the sun with his dog. "
            "One day, Tim and his dog went to the park. They saw a big red ball under a tree.")
    tokens = [tokenizer.eot_id] + tokenizer.encode(text)
    assert len(tokens) > 2 * BLOCK_SIZE
    nlls = token_nlls(model, tokens, stride=stride, batch_size=3)
    assert nlls.shape == (len(tokens) - 1,)
    np.testing.assert_allclose(nlls, brute_force_nlls(model, tokens, stride), atol=1e-4)


def test_window_plan_scores_each_token_once():
    for n_tokens, block_size, stride in ((50, 8, 5), (50, 24, 24), (25, 8, 1), (2, 8, 3)):
        scored = []
        for start, end, first_target in window_plan(n_tokens, block_size, stride):
            scored += list(range(first_target + 1, end + 1))
        assert scored == list(range(1, n_tokens))


def test_window_plan_stride_too_large():
    with pytest.raises(ValueError, match="stride must be between 1 and block_size"):
        window_plan(100, 16, 17)


# ---------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_scores_match_transformers(tokenizer, layout):
    ours = random_model(layout, tokenizer.vocab_size, seed=3)
    theirs = to_hf_model(ours).eval()
    encoded = [encode_pair(tokenizer, c, x) for c, x in PAIRS]
    scores = score_continuations(ours, encoded, batch_size=4, pad_id=tokenizer.pad_id)
    for (context_ids, continuation_ids), score in zip(encoded, scores):
        assert score.logprob == pytest.approx(loop_logprob(theirs, context_ids, continuation_ids), abs=1e-4)


def test_non_overlapping_windows_match_pretraining(tokenizer, model):
    """With stride = block_size the windows are those of pretraining's validation loss."""
    from pretrain.train import evaluate_bits_per_byte

    text = " ".join(["Once upon a time, there was a little boy named Tim who liked to run in the sun."] * 4)
    tokens = np.array([tokenizer.eot_id] + tokenizer.encode(text))
    n_windows = (len(tokens) - 1) // BLOCK_SIZE
    assert n_windows >= 2
    nlls = token_nlls(model, tokens, stride=BLOCK_SIZE, batch_size=2)
    with torch.no_grad():
        expected = evaluate_bits_per_byte(model, tokens, 1.0, BLOCK_SIZE, batch_size=2, max_batches=100)
    assert nlls[:n_windows * BLOCK_SIZE].mean() == pytest.approx(expected["val_loss"], abs=1e-5)
