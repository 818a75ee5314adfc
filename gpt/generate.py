"""Text generation with a KV cache: sampling rules, batched decoding and streaming.

Every stage that generates (`gptlab sample`, the chat app, PPO rollouts, the HTTP
server) calls this module, so they all sample the same way:

- `sample_next` turns the logits of the last position into the next token ids. It is
  built from small pure functions (`apply_repetition_penalty`, `top_k_filter`,
  `top_p_filter`, `sample_from_probs`) applied in the order of `transformers`:
  repetition penalty, temperature, top-k, top-p.
- `generate` runs a batch of prompts of different lengths: the prompts are left-padded
  and prefilled in one pass (with an attention mask when their lengths differ), then each
  step feeds one token per row through the `KVCache` (the one-token step of
  gpt/decoding.py). Rows finish independently, on a stop token id, a stop string or their
  token budget, and finished rows leave the batch.
- `stream` yields the text of one prompt piece by piece. It never splits a UTF-8
  character, and it never shows a stop string or text that may still turn out to be
  the start of one.

Seeds: `SamplingParams.seed` seeds one `torch.Generator` per call, on the model's
device. At each sampling step the generator draws one uniform number per prompt of the
batch, finished or not, and row r samples with number r (`sample_from_probs`). So a
row's text depends on the seed, its index and the batch size, but not on when the other
rows finish. Greedy decoding (temperature 0) draws nothing. The same seed gives the same
text on the same device and torch version; CPU and CUDA generators give different numbers.

KV-cache precision: `kv_cache_dtype` stores the cached keys and values in another dtype
than the one the model computes in, so bfloat16 halves the cache of a float32 model. They
are cast back for attention, and only their rounding changes the logits.

Limits: a sequence (prompt plus generated tokens) never exceeds the model's block_size.
A row that reaches it finishes with reason "length". With model.sliding_window the
attention is masked to the window, but the cache still keeps every position, so the
limit stays.
All rows of a batch share one sampling configuration.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from gpt.config import option
from gpt.device import autocast
from gpt.model import GPT, KVCache

if TYPE_CHECKING:
    from gpt.tokenizer import StreamDecoder, Tokenizer


FinishReason = Literal["stop", "length"]


@dataclass
class SamplingParams:
    """Rules for picking each next token and for stopping, shared by every stage that generates."""

    max_new_tokens: int = option(200, "maximum number of tokens to generate per prompt; generation also stops at the model's block_size")
    temperature: float = option(1.0, "softmax temperature; 0 picks the most likely token (greedy), higher values give more varied text")
    top_k: int = option(0, "sample only among the k most likely tokens; 0 turns the filter off")
    top_p: float = option(1.0, "sample only among the most likely tokens whose probabilities sum to at least top_p (nucleus sampling); 1.0 turns the filter off")
    repetition_penalty: float = option(1.0, "divide positive logits and multiply negative ones by this factor for every token already in the prompt or the output (Keskar et al. 2019, CTRL); 1.0 turns it off")
    stop: list[str] = option([], "strings that end generation when they appear in the output text; they are not included in the returned text")
    stop_token_ids: list[int] | None = option(None, "token ids that end generation; None means the tokenizer's end-of-text id")
    seed: int | None = option(None, "seed of the sampling random generator; the same seed gives the same text; None draws a fresh seed")

    def problems(self) -> list[str]:
        found = []
        if self.max_new_tokens < 1:
            found.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            found.append(f"temperature must be a finite number >= 0 (0 for greedy), got {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            found.append(f"top_p must be in (0, 1] (1.0 turns it off), got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            found.append(f"repetition_penalty must be a finite number > 0 (1.0 turns it off), got {self.repetition_penalty}")
        empty = [i for i, text in enumerate(self.stop) if not isinstance(text, str) or not text]
        if empty:
            found.append(f"stop strings must be non-empty text; entries {empty} of {self.stop!r} are not")
        if self.stop_token_ids is not None:
            bad = [i for i in self.stop_token_ids if not isinstance(i, int) or i < 0]
            if bad:
                found.append(f"stop_token_ids must be non-negative integers, got {bad}")
        return found

    def validate(self) -> None:
        """Raise ValueError listing every problem of these parameters."""
        found = self.problems()
        if found:
            raise ValueError("invalid sampling parameters:\n  " + "\n  ".join(found))


# ---------------------------------------------------------------------------
# Sampling: pure functions of (B, V) logits


def apply_repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalize every token that already occurs in `token_ids` (CTRL, Keskar et al. 2019).

    A positive logit is divided by `penalty` and a negative one multiplied by it, so a
    penalty above 1 always makes the token less likely. Each token is penalized once,
    however often it occurs. `transformers`' RepetitionPenaltyLogitsProcessor (5.x)
    applies the same rule, and a test compares the two.

    Args:
        logits: (B, V) scores of the next token.
        token_ids: (B, S) ids of the tokens seen so far; negative entries are padding and ignored.
        penalty: the factor; 1.0 returns `logits` unchanged.

    Returns:
        (B, V) penalized logits, a new tensor.
    """
    if penalty == 1.0:
        return logits
    B, V = logits.shape
    ids = token_ids.to(logits.device).long()
    ids = torch.where(ids < 0, V, ids)  # padding goes to an extra column that is dropped below
    seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, :V], penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf; ties with the k-th stay.

    Args:
        logits: (B, V).
        k: tokens to keep per row; 0 (or k >= V) returns `logits` unchanged.
    """
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p
    (nucleus sampling, Holtzman et al. 2020), and set the others to -inf.

    The most likely token is always kept.

    Args:
        logits: (B, V).
        p: probability mass to keep, in (0, 1]; 1.0 returns `logits` unchanged.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    remove_sorted = mass_before >= p
    remove = remove_sorted.scatter(1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row by inverting the cumulative distribution.

    Row r takes the first token whose cumulative probability exceeds uniforms[r], so
    each draw uses exactly one uniform number, which makes seeded batches easy to reason
    about. Tokens with probability 0 are never drawn.

    Args:
        probs: (B, V) probabilities; rows need not sum exactly to 1.
        uniforms: (B,) numbers in [0, 1).

    Returns:
        (B,) token ids.
    """
    # float64 keeps the running sum over a large vocabulary exact enough; MPS has no float64.
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(dtype).cumsum(dim=-1)  # (B, V)
    targets = uniforms.to(device=probs.device, dtype=dtype) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(1)
    # Rounding can put the target at the very top of the cdf; take the last possible token then.
    V = probs.size(-1)
    last_possible = V - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(tokens, last_possible)


def sample_next(logits: torch.Tensor, token_ids: torch.Tensor | None, params: SamplingParams,
                generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Choose the next token of each row.

    Applies the repetition penalty, then either takes the argmax (temperature 0) or
    divides by the temperature, filters by top-k and top-p, and samples.

    Args:
        logits: (B, V) logits of the last position, any float dtype.
        token_ids: (B, S) prompt and generated ids so far (negative = padding), for the
            repetition penalty; None when there are none to penalize.
        params: the sampling parameters.
        generator: random source for the uniforms when `uniforms` is None; must be on
            the device of `logits`. None uses torch's global generator.
        uniforms: (B,) numbers in [0, 1) to sample with, one per row, instead of
            drawing them from `generator`.

    Returns:
        (B,) token ids.
    """
    logits = logits.float()
    if token_ids is not None:
        logits = apply_repetition_penalty(logits, token_ids, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    if uniforms is None:
        uniforms = torch.rand(logits.size(0), generator=generator, device=logits.device)
    return sample_from_probs(probs, uniforms)


# ---------------------------------------------------------------------------
# Text: stop strings and streaming


class StopStringMatcher:
    """Find stop strings in text that arrives piece by piece.

    `push` returns only text that can no longer be part of a stop string. It holds back
    the longest end of the text so far that is the beginning of some stop string, until
    later text completes the match or rules it out.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [text for text in stop if text]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to show, whether a stop string just completed).

        When a stop string completes, the returned text ends just before it, and the
        text after it is dropped.
        """
        buffer = self._held + text
        starts = [start for start in (buffer.find(s) for s in self.stop) if start >= 0]
        if starts:
            self._held = ""
            return buffer[:min(starts)], True
        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        """Return the held-back text (the output ended without a stop string) and reset."""
        text, self._held = self._held, ""
        return text

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class _RowText:
    """Visible text of one row. Bytes of an incomplete UTF-8 character wait in the
    tokenizer's StreamDecoder, and possible beginnings of a stop string wait in the matcher."""

    def __init__(self, decoder: StreamDecoder, stop: Sequence[str]) -> None:
        self.decoder = decoder
        self.matcher = StopStringMatcher(stop)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.matcher.push(self.decoder.push(token_id))

    def finish(self) -> str:
        """Release everything held back, at the end of the row's output."""
        text, stopped = self.matcher.push(self.decoder.flush())
        return text if stopped else text + self.matcher.flush()


# ---------------------------------------------------------------------------
# The decoding loop


class StepOutput(NamedTuple):
    """One token generated for one row during one step."""

    row: int  # index of the prompt in the batch
    token: int
    text: str  # text this token made visible; "" without a tokenizer
    finish_reason: FinishReason | None  # set on the row's last token


@dataclass
class Completion:
    """The output of one prompt.

    `tokens` contains every sampled id, including a final stop token id and the tokens
    of a stop string, so it is the exact sequence the model produced (what PPO scores).
    `text` leaves out the stop token and the stop string with anything after it.
    """

    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    text: str = ""  # "" when generated without a tokenizer


def _model_device(model: GPT) -> torch.device:
    return next(model.parameters()).device


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, block_size: int) -> None:
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; start it with the end-of-text token "
                             f"(tokenizer.eot_id) to generate from the beginning of a document")
        if len(prompt) >= block_size:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens but the model's block_size is {block_size}, "
                             f"which leaves no room to generate; shorten the prompt to at most "
                             f"{block_size - 1} tokens")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {row} contains token ids {bad[:5]} outside the model's vocabulary "
                             f"0..{vocab_size - 1}; encode it with the tokenizer the model was trained with")


class _Batch:
    """The tensors of one batched generation: padded prompts, KV cache and token history."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 pad_id: int, device: torch.device, dtype: torch.dtype | None, vocab_limit: int,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        config = model.config
        self.model, self.params, self.device = model, params, device
        self.amp_dtype = dtype if dtype is not None else torch.float32
        self.vocab_limit = vocab_limit
        lengths = [len(p) for p in prompts]
        self.budgets = [min(params.max_new_tokens, config.block_size - n) for n in lengths]
        P = max(lengths)
        B = len(prompts)

        with torch.inference_mode():
            idx = torch.full((B, P), pad_id, dtype=torch.long)
            attention_mask = torch.zeros(B, P, dtype=torch.long)
            for row, prompt in enumerate(prompts):
                idx[row, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
                attention_mask[row, P - len(prompt):] = 1
            self.idx = idx.to(device)
            # Prompts of equal length need no mask, and without one the prefill uses the causal kernel.
            self.attention_mask = attention_mask.to(device) if min(lengths) < P else None
            # The last sampled token is never fed back, hence the -1.
            cache_dtype = self.amp_dtype if self.amp_dtype != torch.float32 else next(model.parameters()).dtype
            if kv_cache_dtype is not None:
                cache_dtype = kv_cache_dtype
            self.cache = KVCache(config, B, P + max(self.budgets) - 1, device=device, dtype=cache_dtype)
            # Prompt and generated ids for the repetition penalty; -1 marks padding and unused columns.
            self.history = None
            if params.repetition_penalty != 1.0:
                self.history = torch.where(attention_mask.to(device).bool(), self.idx, -1)
                self.history = torch.cat([self.history, self.idx.new_full((B, max(self.budgets)), -1)], dim=1)
        self.n_prompt_columns = P

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Run the prompts through the model; return the (B, V) logits of their last tokens."""
        # One pass over the prompts; logits of the last column only, so that no (B, P, V)
        # tensor is built for a long prompt.
        with autocast(self.device, self.amp_dtype):
            out = self.model(self.idx, attention_mask=self.attention_mask, kv_cache=self.cache, logits_to_keep=1)
        return self._mask_vocab(out.logits[:, -1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one (B,) token per active row; return the (B, V) logits of the next one."""
        with autocast(self.device, self.amp_dtype):
            out = self.model(tokens[:, None], kv_cache=self.cache)
        return self._mask_vocab(out.logits[:, -1])

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, step: int, uniforms: torch.Tensor | None) -> torch.Tensor:
        tokens = sample_next(logits, self.history, self.params, uniforms=uniforms)
        if self.history is not None:
            self.history[:, self.n_prompt_columns + step] = tokens
        return tokens

    @torch.inference_mode()
    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in `keep` (positions in the current batch)."""
        self.cache.reorder(keep)
        self.cache.trim_left()
        if self.history is not None:
            self.history = self.history[keep]

    def _mask_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # A model whose vocab_size was padded past the tokenizer's must never sample the extra ids.
        if self.vocab_limit < logits.size(-1):
            logits = logits.clone()
            logits[:, self.vocab_limit:] = float("-inf")
        return logits


def generate_steps(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                   tokenizer: Tokenizer | None = None, pad_id: int | None = None,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None,
                   kv_cache_dtype: torch.dtype | None = None) -> Iterator[list[StepOutput]]:
    """Generate for a batch of prompts, step by step: each step gives the new token of every active row.

    This is the loop under `generate` and `stream`; use it directly to stream several
    prompts at once. The model is put in eval mode while the iterator runs and its
    previous mode is restored when the iterator ends or is closed.

    Args:
        model: the GPT.
        prompts: token ids of each prompt, of any lengths from 1 to block_size - 1.
        params: sampling parameters; all rows share them.
        tokenizer: needed for stop strings and text. It also gives the default stop
            token id (end of text) and pad id, and sampling stays within its vocabulary.
        pad_id: id written into padding positions; they are masked, so any valid id
            works. Defaults to the tokenizer's pad id, else 0.
        device: the device the model is on; found from its parameters by default.
        dtype: autocast dtype such as torch.bfloat16; None or torch.float32 computes in
            the model's own dtype.
        kv_cache_dtype: dtype of the cached keys and values, such as torch.bfloat16; None
            keeps them in the compute dtype.

    Returns:
        An iterator that yields, at each step, a list of StepOutput: one per row still
        active, in row order. The model runs only while it is iterated.

    Raises:
        ValueError: at the call, before any model work, for invalid parameters, an empty
            prompt, a prompt that leaves no room below block_size, token ids outside the
            vocabulary, or stop strings without a tokenizer.
    """
    params.validate()
    config = model.config
    if params.stop and tokenizer is None:
        raise ValueError(f"stop strings {params.stop!r} are matched on the text, which needs a tokenizer; "
                         f"pass tokenizer=... or use stop_token_ids")
    _check_prompts(prompts, config.vocab_size, config.block_size)
    if not prompts:
        return iter([])
    stop_ids = params.stop_token_ids
    if stop_ids is None:
        stop_ids = [tokenizer.eot_id] if tokenizer is not None else []
    stop_ids = set(stop_ids)
    if pad_id is None:
        pad_id = tokenizer.pad_id if tokenizer is not None else 0
    if not 0 <= pad_id < config.vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary 0..{config.vocab_size - 1}")
    device = torch.device(device) if device is not None else _model_device(model)
    vocab_limit = min(config.vocab_size, tokenizer.vocab_size) if tokenizer is not None else config.vocab_size

    generator = None
    if params.temperature > 0:
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()

    return _run_in_eval_mode(model, _decode_loop(model, prompts, params, tokenizer, stop_ids, pad_id, device,
                                                 dtype, vocab_limit, generator, kv_cache_dtype))


def _run_in_eval_mode(model: GPT, steps: Iterator[list[StepOutput]]) -> Iterator[list[StepOutput]]:
    was_training = model.training
    model.eval()
    try:
        yield from steps
    finally:
        model.train(was_training)


def _decode_loop(model, prompts, params, tokenizer, stop_ids, pad_id, device, dtype, vocab_limit,
                 generator, kv_cache_dtype) -> Iterator[list[StepOutput]]:
    batch = _Batch(model, prompts, params, pad_id, device, dtype, vocab_limit, kv_cache_dtype)
    B = len(prompts)
    texts = [_RowText(tokenizer.stream_decoder(), params.stop) if tokenizer is not None else None
             for _ in range(B)]
    counts = [0] * B
    active = list(range(B))  # prompt index of each row of the current batch
    logits = batch.prefill()
    step = 0
    while True:
        uniforms = None
        if generator is not None:
            # One number per prompt of the batch, finished or not, so that a row's draws do
            # not depend on when the other rows finish.
            uniforms = torch.rand(B, generator=generator, device=device)
            if len(active) < B:
                uniforms = uniforms[torch.tensor(active, device=device)]
        tokens = batch.sample(logits, step, uniforms)
        outputs, keep = [], []
        for position, (row, token) in enumerate(zip(active, tokens.tolist())):
            counts[row] += 1
            text, reason = _advance_row(texts[row], token, stop_ids)
            if reason is None and counts[row] >= batch.budgets[row]:
                reason = "length"
                if texts[row] is not None:
                    text += texts[row].finish()
            outputs.append(StepOutput(row, token, text, reason))
            if reason is None:
                keep.append(position)
        yield outputs
        if not keep:
            return
        if len(keep) < len(active):
            keep_index = torch.tensor(keep, device=device)
            batch.keep_rows(keep_index)
            tokens = tokens[keep_index]
            active = [active[i] for i in keep]
        logits = batch.decode(tokens)
        step += 1


def _advance_row(text: _RowText | None, token: int, stop_ids: set[int]) -> tuple[str, FinishReason | None]:
    """Return the text `token` makes visible and "stop" when it ends the row."""
    if token in stop_ids:
        # The stop token itself is not shown, but what was held back is real output.
        return (text.finish() if text is not None else ""), "stop"
    if text is None:
        return "", None
    piece, stopped = text.push(token)
    return piece, "stop" if stopped else None


def generate(model: GPT, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             tokenizer: Tokenizer | None = None, pad_id: int | None = None,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None,
             kv_cache_dtype: torch.dtype | None = None) -> list[Completion]:
    """Generate a completion for each prompt, batched with a KV cache.

    Greedy decoding (temperature 0) of a batch gives each row the tokens it would get
    alone, up to floating-point differences between padded and unpadded attention.
    See `generate_steps` for the arguments and errors.

    Returns:
        One Completion per prompt, in order, with the ids, the finish reason ("stop" or
        "length") and, when a tokenizer is given, the text.
    """
    completions = [Completion() for _ in prompts]
    for outputs in generate_steps(model, prompts, params, tokenizer=tokenizer, pad_id=pad_id,
                                  device=device, dtype=dtype, kv_cache_dtype=kv_cache_dtype):
        for out in outputs:
            completion = completions[out.row]
            completion.tokens.append(out.token)
            completion.text += out.text
            if out.finish_reason is not None:
                completion.finish_reason = out.finish_reason
    return completions


class TextStream:
    """Iterator over the text pieces of one generation; see `stream`.

    After the iteration ends, `tokens` contains the generated ids and `finish_reason`
    is "stop" or "length". `close()` stops generation early.
    """

    def __init__(self, steps: Iterator[list[StepOutput]]) -> None:
        self._steps = steps
        self._pieces = self._texts()
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self._steps.close()

    def _texts(self) -> Iterator[str]:
        for outputs in self._steps:
            (out,) = outputs
            self.tokens.append(out.token)
            if out.finish_reason is not None:
                self.finish_reason = out.finish_reason
            if out.text:
                yield out.text


def stream(model: GPT, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams, *,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           kv_cache_dtype: torch.dtype | None = None) -> TextStream:
    """Generate from one prompt and yield the text as it is produced.

    Each piece is whole characters, because bytes of a character split across tokens
    wait for the rest. Stop strings are matched on the text, even when they span several
    tokens, and are never yielded. Text that could be the start of a stop string is held
    back until later text completes or rules out the match. The pieces concatenate to the text `generate` returns for the same
    prompt, parameters and seed.

    Returns:
        A TextStream of non-empty str pieces; see `generate_steps` for the arguments and errors.
    """
    steps = generate_steps(model, [list(prompt_ids)], params, tokenizer=tokenizer, device=device, dtype=dtype,
                           kv_cache_dtype=kv_cache_dtype)
    return TextStream(steps)
