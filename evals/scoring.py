"""Log-likelihood scoring: continuations given a context, and sliding-window perplexity.

Tokenization rule for a (context, continuation) pair (`encode_pair`). Whitespace at
the end of the context moves to the front of the continuation, as lm-evaluation-harness
does, so "Answer: " + "Paris" scores " Paris", the token a byte-level BPE model
actually predicts. Then the context and the continuation are encoded separately, and
the continuation's tokens follow the context's. So every scored token is a token of
the continuation and every conditioning token a token of the context, even where the
joined text would merge a token across the join ("ti" + "me" -> " time"). In that case
the model is given a split of the text that its tokenizer would not produce.
lm-evaluation-harness 0.4 instead encodes the joined text and cuts it at the context's
token count, so on a merge the first characters of the continuation become context
and are not scored. Each context starts with `<|endoftext|>`, the document boundary
that every pretraining document starts with, so an empty context is scored from it alone.

A pair longer than block_size + 1 tokens loses context tokens from the left. A
continuation longer than block_size tokens is scored in chunks of block_size tokens,
each chunk conditioned on the block_size tokens before its last token.

Sliding-window perplexity (`token_nlls`): windows of block_size tokens start every
`stride` tokens. Each window scores only the tokens that no earlier window scored, so
each token is scored exactly once, with at least block_size - stride tokens of context
once the first window is full.

Reward scoring (`load_reward_scorer`) reads the folder that `gptlab reward` writes:
a GPT checkpoint (the trunk) whose model.json has a "reward_model" field naming the
head file, reward_head.safetensors, which contains a linear layer n_embd -> 1 (its bias
optional) applied to the final hidden state of the conversation's last token.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gpt.chat import render_chat
from gpt.checkpoint import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    check_checkpoint_dir,
    load_model,
    read_model_meta,
    read_safetensors,
)
from gpt.device import autocast
from gpt.model import GPT
from gpt.tokenizer import Tokenizer

REWARD_META_KEY = "reward_model"
REWARD_HEAD_FILE = "reward_head.safetensors"


@dataclass
class ContinuationScore:
    """The log-likelihood of one continuation given its context.

    Attributes:
        logprob: sum over the continuation's tokens of log p(token | everything before it), in nats.
        is_greedy: every continuation token is the argmax of its position's distribution.
        n_tokens: number of continuation tokens scored.
        truncated: context tokens were dropped from the left to fit the first row into block_size.
    """

    logprob: float
    is_greedy: bool
    n_tokens: int
    truncated: bool = False


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Encode a (context, continuation) pair by the rule in the module docstring.

    Returns:
        (context_ids, continuation_ids): context_ids starts with `<|endoftext|>`.

    Raises:
        ValueError: the continuation is empty after the whitespace move.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    continuation_ids = tokenizer.encode(continuation)
    if not continuation_ids:
        raise ValueError(f"empty continuation after context {context[-60:]!r}; a scored continuation needs at least "
                         f"one character")
    return [tokenizer.eot_id] + tokenizer.encode(context), continuation_ids


def _model_device(model: GPT) -> torch.device:
    return next(model.parameters()).device


def continuation_rows(context: Sequence[int], continuation: Sequence[int],
                      block_size: int) -> list[tuple[list[int], list[int]]]:
    """Split the scoring of one pair into model inputs of at most block_size tokens.

    The continuation's tokens are cut into chunks of at most block_size tokens, in
    order. Each chunk becomes one row: the block_size tokens (or all there are) that
    precede the chunk's last token, whose final positions predict the chunk. So a
    continuation that fits in one window is one row with as much context as fits, and a
    longer one is scored piece by piece, each piece with the tokens just before it.

    Returns:
        (input ids, target ids) per row; the targets are predicted by the last
        len(targets) positions of the input.
    """
    ids = list(context) + list(continuation)
    first = len(context)  # index in ids of the first continuation token
    rows = []
    for a in range(first, len(ids), block_size):
        b = min(a + block_size, len(ids))  # targets ids[a:b], predicted from ids[a - 1:b - 1]
        rows.append((ids[max(0, b - 1 - block_size):b - 1], ids[a:b]))
    return rows


@torch.no_grad()
def score_continuations(model: GPT, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                        dtype: torch.dtype = torch.float32, pad_id: int = 0) -> list[ContinuationScore]:
    """Score many (context_ids, continuation_ids) pairs, several rows per forward pass.

    A pair longer than block_size + 1 tokens loses context from the left, and a
    continuation longer than block_size is scored in several rows (`continuation_rows`).
    Rows are right-padded, which needs no attention mask: a causal model's real tokens
    never attend to the padding after them. Rows are sorted by length so that each batch
    contains rows of similar length.

    Args:
        model: the GPT, in eval mode for deterministic scores (this function does not change its mode).
        pairs: token ids of each context (non-empty) and continuation (non-empty).
        batch_size: rows per forward pass.
        dtype: autocast dtype of the forward pass; log-softmax is always taken in float32.
        pad_id: token id written into padding positions; any valid id gives the same scores.

    Returns:
        One ContinuationScore per pair, in the order of `pairs`.

    Raises:
        ValueError: an empty context or continuation.
    """
    block_size = model.config.block_size
    rows = []  # (pair index, input ids, target ids)
    truncated = []
    for index, (context, continuation) in enumerate(pairs):
        if not context or not continuation:
            raise ValueError(f"pair {index}: context and continuation need at least one token each, got "
                             f"{len(context)} and {len(continuation)}; start contexts with the end-of-text token")
        rows += [(index, inputs, targets) for inputs, targets in continuation_rows(context, continuation, block_size)]
        # The first row contains the context and up to block_size continuation tokens, less the last one.
        truncated.append(len(context) + min(len(continuation), block_size) - 1 > block_size)

    device = _model_device(model)
    logprob_sums = [0.0] * len(pairs)
    greedy = [True] * len(pairs)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    for start in range(0, len(order), batch_size):
        chunk = [rows[r] for r in order[start:start + batch_size]]
        idx = torch.full((len(chunk), max(len(inputs) for _, inputs, _ in chunk)), pad_id, dtype=torch.long)
        for row, (_, inputs, _) in enumerate(chunk):
            idx[row, :len(inputs)] = torch.tensor(inputs)
        with autocast(device, dtype):
            logits = model(idx.to(device)).logits  # (B, T, V)
        for row, (index, inputs, targets) in enumerate(chunk):
            n = len(targets)
            logprobs = F.log_softmax(logits[row, len(inputs) - n:len(inputs)].float(), dim=-1)  # (n, V)
            target_ids = torch.tensor(targets, device=device)
            logprob_sums[index] += float(logprobs.gather(-1, target_ids[:, None]).double().sum())
            greedy[index] = greedy[index] and bool((logprobs.argmax(dim=-1) == target_ids).all())
    return [ContinuationScore(logprob_sums[i], greedy[i], len(pairs[i][1]), truncated[i]) for i in range(len(pairs))]


def predict_choices(choices: Sequence[Sequence[str]],
                    scores: Sequence[ContinuationScore]) -> dict[str, list[int]]:
    """Pick a choice per question by three rules: the highest log-likelihood ("acc"), per
    UTF-8 byte of the choice text ("acc_norm"), and per continuation token ("acc_per_token").

    Args:
        choices: the choice texts of each question, without the delimiter that joins them to it.
        scores: the scores of every choice of every question, in the same order, flattened.

    Returns:
        The predicted choice index of each question under each rule.
    """
    predictions: dict[str, list[int]] = {"acc": [], "acc_norm": [], "acc_per_token": []}
    position = 0
    for texts in choices:
        chosen = scores[position:position + len(texts)]
        position += len(texts)
        logprobs = np.array([s.logprob for s in chosen])
        n_bytes = np.array([max(len(text.encode("utf-8")), 1) for text in texts])
        n_tokens = np.array([s.n_tokens for s in chosen])
        predictions["acc"].append(int(np.argmax(logprobs)))
        predictions["acc_norm"].append(int(np.argmax(logprobs / n_bytes)))
        predictions["acc_per_token"].append(int(np.argmax(logprobs / n_tokens)))
    assert position == len(scores), "every score must belong to a choice"
    return predictions


def window_plan(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Plan the sliding windows over a sequence of `n_tokens` tokens.

    Returns:
        (start, end, first_target) per window: the input is tokens[start:end], the targets
        are tokens[start + 1:end + 1], and only targets with index > first_target are
        scored. Every index 1..n_tokens - 1 is scored by exactly one window.

    Raises:
        ValueError: stride is not in 1..block_size.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and block_size ({block_size}), got {stride}; a stride above "
                         f"block_size would leave tokens unscored")
    windows = []
    start, scored_until = 0, 0
    while scored_until < n_tokens - 1:
        end = min(start + block_size, n_tokens - 1)
        windows.append((start, end, scored_until))
        scored_until = end
        start += stride
    return windows


@torch.no_grad()
def token_nlls(model: GPT, tokens: Sequence[int] | np.ndarray, *, stride: int, batch_size: int = 8,
               dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Negative log-likelihood of every token after the first, by sliding windows.

    Args:
        model: the GPT; windows are model.config.block_size tokens long.
        tokens: the token ids of the text, usually starting with `<|endoftext|>`.
        stride: tokens between the starts of consecutive windows, 1..block_size. A token
            scored by a later window has at least block_size - stride tokens of context.
        batch_size: windows per forward pass.
        dtype: autocast dtype of the forward pass.

    Returns:
        A float64 array of shape (len(tokens) - 1,): entry t - 1 is -log p(tokens[t] | context).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = len(tokens)
    nlls = np.full(max(n - 1, 0), np.nan)
    if n < 2:
        return nlls
    device = _model_device(model)
    windows = window_plan(n, model.config.block_size, stride)
    for first in range(0, len(windows), batch_size):
        chunk = windows[first:first + batch_size]
        T = max(end - start for start, end, _ in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for row, (start, end, _) in enumerate(chunk):
            idx[row, :end - start] = torch.from_numpy(tokens[start:end])
        with autocast(device, dtype):
            logits = model(idx.to(device)).logits  # (B, T, V)
        for row, (start, end, scored_until) in enumerate(chunk):
            # Input position p predicts token start + p + 1; the new targets are scored_until + 1 .. end.
            positions = slice(scored_until - start, end - start)
            targets = torch.from_numpy(tokens[scored_until + 1:end + 1]).to(device)
            losses = F.cross_entropy(logits[row, positions].float(), targets, reduction="none")
            nlls[scored_until:end] = losses.double().cpu().numpy()
    assert not np.isnan(nlls).any(), "a token was left unscored by the window plan"
    return nlls


class RewardScorer:
    """A reward model as a callable: a GPT trunk and a linear head on the last token's hidden state.

    Call it with a list of conversations ({"role", "content"} messages ending with the
    assistant's reply); it returns one float reward per conversation.
    """

    def __init__(self, trunk: GPT, weight: torch.Tensor, bias: torch.Tensor, tokenizer: Tokenizer, *,
                 batch_size: int = 16, dtype: torch.dtype = torch.float32) -> None:
        self.trunk = trunk.eval()
        self.weight, self.bias = weight.float(), bias.float()  # (C,), ()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[float]:
        block_size = self.trunk.config.block_size
        # The reward is read at the final token (the <|end|> closing the reply), so an
        # over-long conversation loses tokens from its start.
        rows = [render_chat(self.tokenizer, c, source=f"conversation {i}")[0][-block_size:]
                for i, c in enumerate(conversations)]
        device = _model_device(self.trunk)
        rewards = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            # Right padding needs no attention mask: the real tokens never attend to it.
            idx = torch.full((len(chunk), max(map(len, chunk))), self.tokenizer.pad_id, dtype=torch.long)
            for i, ids in enumerate(chunk):
                idx[i, :len(ids)] = torch.tensor(ids)
            with autocast(device, self.dtype):
                hidden = self.trunk(idx.to(device), return_hidden=True, compute_logits=False).hidden  # (B, T, C)
            last = torch.tensor([len(ids) - 1 for ids in chunk], device=device)
            final = hidden[torch.arange(len(chunk), device=device), last].float()  # (B, C)
            rewards += (final @ self.weight.to(device) + self.bias.to(device)).tolist()
        return rewards


def load_reward_scorer(ckpt_dir: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, batch_size: int = 16) -> RewardScorer:
    """Load the reward model folder that `gptlab reward` writes (format in the module docstring).

    Raises:
        FileNotFoundError: the folder, its weights, its head or its tokenizer is missing.
        ValueError: the folder contains a language model, or the head does not fit the trunk.
    """
    # NOTE: this reads the format of rlhf/reward.py (save_reward_model), which a stage may not import.
    ckpt_dir = check_checkpoint_dir(ckpt_dir, need=(MODEL_FILE, MODEL_CONFIG_FILE, TOKENIZER_FILE))
    meta = read_model_meta(ckpt_dir)
    if REWARD_META_KEY not in meta:
        raise ValueError(f"{ckpt_dir} contains a language model, not a reward model: its {MODEL_CONFIG_FILE} has no "
                         f"{REWARD_META_KEY!r} field. Pass the folder that gptlab reward wrote (runs/NAME/reward)")
    head_path = ckpt_dir / meta[REWARD_META_KEY].get("head", REWARD_HEAD_FILE)
    if not head_path.is_file():
        raise FileNotFoundError(f"reward model {ckpt_dir} is missing its head {head_path.name}; rerun gptlab reward")
    trunk = load_model(ckpt_dir, device=device)
    head = read_safetensors(head_path)
    n_embd = trunk.config.n_embd
    weight, bias = head.get("weight"), head.get("bias", torch.zeros(1))
    if weight is None or set(head) - {"weight", "bias"} or tuple(weight.shape) != (1, n_embd) or bias.numel() != 1:
        shapes = {name: tuple(t.shape) for name, t in head.items()}
        raise ValueError(f"{head_path} contains {shapes}, but a reward head for n_embd {n_embd} is a weight "
                         f"(1, {n_embd}) and an optional bias (1,); the head belongs to another model")
    tokenizer = Tokenizer.from_file(ckpt_dir / TOKENIZER_FILE)
    return RewardScorer(trunk, weight[0], bias.reshape(()), tokenizer, batch_size=batch_size, dtype=dtype)
