"""Preference pairs as model input: render both replies after the same prompt tokens with
the chat template, fit them into block_size, and batch them.

Fitting to block_size: when the prompt and the longer reply do not fit, the prompt gets a
budget, the room the longer reply leaves but no less than max_prompt_tokens. It loses
whole turns from its start until it fits the budget, and a last user message that alone
exceeds the budget keeps its end. The replies are then cut to the room left, so a cut
reply has no closing <|end|>.

Batches (`collate_pairs`, `PairBatches`) put the B chosen sequences first and the B
rejected ones after them, one per row, or packed several to a row for DPO.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpt.chat import render_chat, render_prompt
from gpt.model import packed_attention_mask
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer
from rlhf.preference_formats import Messages, PreferencePair

PAD_ID = SPECIAL_TOKENS.index("<|pad|>")


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: the rendered prompt, ending with <|assistant|>, and each reply's
    tokens after it (content and <|end|>, unless cut to fit block_size)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


@dataclass
class FitStats:
    """Counts of one `tokenize_pairs` call."""

    kept: int = 0
    prompt_shortened: int = 0
    replies_cut: int = 0
    identical_after_cut: int = 0  # dropped


def _reply_ids(tokenizer: Tokenizer, prompt: Messages, prompt_ids: list[int], reply: str, where: str) -> list[int]:
    ids, _ = render_chat(tokenizer, [*prompt, {"role": "assistant", "content": reply}], source=where)
    assert ids[:len(prompt_ids)] == prompt_ids, "the generation prompt must be a prefix of the rendered conversation"
    return ids[len(prompt_ids):]


def _shorten_prompt(tokenizer: Tokenizer, prompt: Messages, budget: int, where: str) -> list[int]:
    """Render the prompt in at most `budget` tokens. Whole turns are dropped from the start,
    and if the last user message alone is too long, it keeps its end."""
    for start in range(1, len(prompt)):
        if prompt[start]["role"] == "user":
            ids = render_prompt(tokenizer, prompt[start:], source=where)
            if len(ids) <= budget:
                return ids
    ids = render_prompt(tokenizer, prompt[-1:], source=where)
    return ids[:1] + ids[len(ids) - budget + 1:]  # keep the leading <|endoftext|>


def fit_pair(tokenizer: Tokenizer, pair: PreferencePair, block_size: int,
             max_prompt_tokens: int) -> tuple[TokenizedPair, bool, bool]:
    """Render a pair and fit prompt + each reply into block_size tokens (see the module docstring).

    Returns:
        (the tokenized pair, whether the prompt was shortened, whether a reply was cut).
    """
    prompt_ids = render_prompt(tokenizer, pair.prompt, source=pair.where)
    chosen = _reply_ids(tokenizer, pair.prompt, prompt_ids, pair.chosen, pair.where)
    rejected = _reply_ids(tokenizer, pair.prompt, prompt_ids, pair.rejected, pair.where)
    longest = max(len(chosen), len(rejected))
    shortened = cut = False
    if len(prompt_ids) + longest > block_size:
        budget = max(block_size - longest, min(len(prompt_ids), max_prompt_tokens))
        if len(prompt_ids) > budget:
            prompt_ids = _shorten_prompt(tokenizer, pair.prompt, budget, pair.where)
            shortened = True
        room = block_size - len(prompt_ids)
        cut = longest > room
        chosen, rejected = chosen[:room], rejected[:room]
    return TokenizedPair(prompt_ids, chosen, rejected), shortened, cut


def tokenize_pairs(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], block_size: int,
                   max_prompt_tokens: int = 0) -> tuple[list[TokenizedPair], FitStats]:
    """Apply `fit_pair` to every pair; drop and count those whose cut replies are identical.

    Args:
        max_prompt_tokens: the smallest budget a long prompt is shortened to (see the module
            docstring); 0 for half of block_size.
    """
    max_prompt_tokens = max_prompt_tokens or block_size // 2
    if not 0 < max_prompt_tokens < block_size:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens} must be in [1, block_size - 1] = [1, "
                         f"{block_size - 1}], so that every reply keeps at least one token.")
    stats = FitStats()
    fitted = []
    for pair in pairs:
        tokenized, shortened, cut = fit_pair(tokenizer, pair, block_size, max_prompt_tokens)
        if tokenized.chosen == tokenized.rejected:
            stats.identical_after_cut += 1
            continue
        stats.prompt_shortened += shortened
        stats.replies_cut += cut
        fitted.append(tokenized)
    stats.kept = len(fitted)
    return fitted, stats


def pack_sequences(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group sequences into rows of at most `capacity` tokens (best-fit decreasing).

    Each sequence, longest first, goes to the row whose free space it fills most
    tightly, or opens a new row. Returns the sequence indices of each row.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fitting = [row for row in range(len(rows)) if free[row] >= lengths[index]]
        if fitting:
            row = min(fitting, key=lambda r: free[r])
            rows[row].append(index)
            free[row] -= lengths[index]
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int = PAD_ID, pack: bool = False) -> dict[str, Any]:
    """Build one micro-batch of the 2B sequences of B pairs: the chosen ones are sequences
    0..B-1 and the rejected ones B..2B-1.

    Unpacked, row i contains sequence i, right-padded to the longest. Packed, several
    sequences share a row no longer than the longest sequence, kept apart by a
    block-diagonal causal mask, with positions restarting at 0 for each. On the
    hh-rlhf batches of benchmarks/bench_dpo.py (8 pairs, block_size 256), padding is 46%
    of the tokens unpacked and 12% packed.

    Returns:
        A dict of R rows of T tokens:
        - input_ids (R, T).
        - attention_mask: (R, T) with 0 on padding, or, packed, a boolean (R, 1, T, T).
        - position_ids: None, or, packed, (R, T).
        - reply_mask (R, T), True on reply tokens.
        - segments (R, T), the sequence index of each token, -1 on padding.
        - n_pairs (B) and n_tokens (the number of real tokens).
    """
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lengths = [len(p.prompt) for p in pairs] * 2
    T = max(len(sequence) for sequence in sequences)
    rows = pack_sequences([len(s) for s in sequences], T) if pack else [[i] for i in range(len(sequences))]
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), T, dtype=torch.long)
    reply_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            end = start + len(sequences[index])
            input_ids[r, start:end] = torch.tensor(sequences[index])
            position_ids[r, start:end] = torch.arange(end - start)
            reply_mask[r, start + prompt_lengths[index]:end] = True
            segments[r, start:end] = index
            start = end
    batch = {"input_ids": input_ids, "reply_mask": reply_mask, "segments": segments, "n_pairs": len(pairs),
             "n_tokens": int((segments >= 0).sum())}
    if pack:
        batch["attention_mask"] = packed_attention_mask(segments)  # (R, 1, T, T)
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = (segments >= 0).long()
        batch["position_ids"] = None
    return batch


class PairBatches:
    """Micro-batches of pairs, each epoch in a new order drawn from (seed, epoch).

    The state is the number of pairs the whole job has consumed, so a resumed run, even
    with a different number of processes, continues with the same pairs.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, pack: bool = False) -> None:
        if not pairs:
            raise ValueError("no pairs to make batches of")
        self.pairs, self.batch_size, self.seed, self.pack = list(pairs), batch_size, seed, pack
        self.rank, self.world_size = rank, world_size
        self.consumed = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])

    def _pair(self, position: int) -> TokenizedPair:
        epoch, offset = divmod(position, len(self.pairs))
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(len(self.pairs), generator=generator).tolist()
            self._order_epoch = epoch
        return self.pairs[self._order[offset]]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            start = self.consumed + self.rank * self.batch_size
            batch = [self._pair(start + i) for i in range(self.batch_size)]
            self.consumed += self.batch_size * self.world_size
            yield collate_pairs(batch, pack=self.pack)

    def in_order(self, max_batches: int) -> Iterator[dict[str, Any]]:
        """Yield the first max_batches micro-batches of the pairs in their stored order (for evaluation)."""
        for start in range(0, min(len(self.pairs), max_batches * self.batch_size), self.batch_size):
            yield collate_pairs(self.pairs[start:start + self.batch_size], pack=self.pack)
