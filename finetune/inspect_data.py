"""The `inspect-data` stage: look at chat data the way SFT trains on it.

    gptlab inspect-data data=gpteacher:0.5,identity:3 tokenizer=runs/NAME/pretrain

Prints a few conversations rendered by the chat template, fitted to block_size, with
the tokens that carry loss highlighted (green on a terminal, between « and » otherwise)
and the special tokens shown as their text. Then prints counts over the whole data:
conversations, turns, tokens, trained tokens, and the conversations that block_size
truncates or drops.

When the tokenizer comes from a checkpoint folder (one with model.json), block_size
defaults to the checkpoint's, as in `gptlab sft`, and may not exceed it. A tokenizer.json
outside a checkpoint, such as the one at the top of a run folder, needs block_size set.

Limits: without color, text typed inside a message that looks like a special token
("<|user|>") or a marker (« ») prints the same as the real one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from gpt.chat import END_OF_TURN, render_chat
from gpt.chat_formats import Conversation
from gpt.checkpoint import MODEL_CONFIG_FILE, TOKENIZER_FILE, read_model_meta
from gpt.config import option
from gpt.sft_data import DEFAULT_NAMES, fit_conversations, load_mix
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

logger = logging.getLogger(__name__)

GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"
TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


@dataclass
class InspectConfig:
    """Settings of `gptlab inspect-data`."""

    data: str = dataclasses.field(metadata={"help": "chat data: a catalog name (gpteacher, chitchat, identity, ...), a .json/.jsonl/.parquet file, folder or glob, a Hub dataset, or a mix such as gpteacher:0.5,identity:3 (weight = share of the source to take; above 1 repeats it)"})
    tokenizer: str = option("runs/default/pretrain", "tokenizer.json, or a folder that contains one; a checkpoint folder (with model.json) also gives the default block_size")
    block_size: int = option(0, "maximum tokens per training example; longer conversations lose whole turns from the end, and are dropped when their first exchange does not fit. 0 for the block_size of the checkpoint that tokenizer names, which is also the maximum, as in sft")
    num_examples: int = option(3, "number of conversations to print, drawn at random with seed")
    max_examples: int = option(0, "read at most this many conversations from each source; 0 reads all")
    split: str = option("train", "split of a Hub dataset given by name (catalog entries use their own split)")
    seed: int = option(1337, "seed of the mix weights' random subsets and of the examples printed")
    name: str | None = option(None, f"assistant name for {{{{name}}}} placeholders; none for {DEFAULT_NAMES['name']!r}")
    author: str | None = option(None, f"author for {{{{author}}}} placeholders; none for {DEFAULT_NAMES['author']!r}")
    color: bool | None = option(None, "highlight trained tokens with ANSI colors: true, false, or none for color when stdout is a terminal")

    def names(self) -> dict[str, str] | None:
        """Return the placeholder values the user set, or None to leave the defaults to the loader."""
        if self.name is None and self.author is None:
            return None
        return {"name": self.name or DEFAULT_NAMES["name"], "author": self.author or DEFAULT_NAMES["author"]}

    def problems(self) -> list[str]:
        found = []
        if not self.data.strip():
            found.append("data is empty; name a catalog set, a file or a mix, for example data=identity")
        if self.block_size < 0:
            found.append(f"block_size must be 0 (the checkpoint's) or a positive number of tokens, got {self.block_size}")
        if self.num_examples < 0:
            found.append(f"num_examples must be 0 or more, got {self.num_examples}")
        if self.max_examples < 0:
            found.append(f"max_examples must be 0 (all) or more, got {self.max_examples}")
        return found


def resolve_tokenizer(path: str) -> Path:
    """Return `path`, or the tokenizer.json inside it when it is a folder."""
    resolved = Path(path)
    return resolved / TOKENIZER_FILE if resolved.is_dir() else resolved


def resolve_block_size(requested: int, tokenizer_file: Path) -> int:
    """Return the block_size to fit to: `requested`, or the checkpoint's when it is 0.

    The checkpoint is the folder of `tokenizer_file`, when that folder has model.json.

    Raises:
        ValueError: `requested` is above the checkpoint's block_size, or is 0 while the
            tokenizer comes from no checkpoint.
    """
    model_file = tokenizer_file.parent / MODEL_CONFIG_FILE
    if not model_file.is_file():
        if requested == 0:
            raise ValueError(f"block_size=0 takes the block_size of a checkpoint, but {tokenizer_file.parent} has no "
                             f"{MODEL_CONFIG_FILE}; set tokenizer to a checkpoint folder such as runs/NAME/pretrain, "
                             "or set block_size, for example block_size=512")
        return requested
    model_block_size = read_model_meta(tokenizer_file.parent)["model"]["block_size"]
    if requested > model_block_size:
        raise ValueError(f"block_size {requested} is larger than the checkpoint's block_size {model_block_size} "
                         f"({model_file}); use block_size={model_block_size} or less, or 0 for the checkpoint's")
    return requested or model_block_size


def format_tokens(tokenizer: Tokenizer, ids: list[int], mask: list[int], color: bool) -> str:
    """Decode ids for reading: trained tokens (mask 1) in green or between « and », special
    tokens as their text, and a line break after each <|end|> (the template itself has none)."""
    end_id = tokenizer.special_id(END_OF_TURN)
    pieces = []
    trained_open = False
    # Group consecutive text tokens with the same mask; every special token is a group of its own.
    def group_key(item: tuple[int, tuple[int, int]]) -> tuple[int, int | None]:
        position, (token, trained) = item
        return trained, (position if token < len(SPECIAL_TOKENS) else None)

    for (trained, special_position), group in itertools.groupby(enumerate(zip(ids, mask)), key=group_key):
        tokens = [token for _, (token, _) in group]
        # A run of text tokens between special tokens is whole message content, so it decodes
        # to complete characters.
        text = tokenizer.decode(tokens)
        if color:
            style = ""
            if trained:
                style += GREEN
            if special_position is not None:
                style += DIM
            pieces.append(f"{style}{text}{RESET}" if style else text)
        else:
            if trained and not trained_open:
                pieces.append(TRAINED_OPEN)
            elif not trained and trained_open:
                pieces.append(TRAINED_CLOSE)
            trained_open = bool(trained)
            pieces.append(text)
        if tokens == [end_id]:
            if trained_open:
                pieces.append(TRAINED_CLOSE)
                trained_open = False
            pieces.append("\n")
    if trained_open:
        pieces.append(TRAINED_CLOSE)
    return "".join(pieces)


def _print_example(tokenizer: Tokenizer, conversation: Conversation, fitted: tuple[list[int], list[int]] | None,
                   length: int, title: str, block_size: int, color: bool) -> None:
    header = f"{title} | {len(conversation)} turns"
    if fitted is None:
        # Show the start of the whole conversation, unhighlighted: none of it is trained.
        ids = render_chat(tokenizer, conversation)[0][:block_size]
        mask = [0] * len(ids)
        header += f" | dropped: {length:,} tokens, its first exchange does not fit block_size {block_size}"
    else:
        ids, mask = fitted
        header += f" | {len(ids):,} tokens, {sum(mask):,} trained"
        if len(ids) < length:
            header += f" | truncated from {length:,} tokens"
    print(f"=== {header} ===")
    print(format_tokens(tokenizer, ids, mask, color))
    print()


def run(cfg: InspectConfig) -> dict[str, float]:
    """Print example renderings and counts of `cfg.data` (see the module docstring).

    Returns:
        The counts printed: conversations, kept, turns, assistant_turns, tokens,
        trained_tokens, truncated, dropped, mean_tokens and max_tokens, and the
        block_size they were fitted to.

    Raises:
        ValueError: the tokenizer file or the data is missing or invalid, or block_size
            does not fit the checkpoint (see `resolve_block_size`).
    """
    tokenizer_file = resolve_tokenizer(cfg.tokenizer)
    tokenizer = Tokenizer.from_file(tokenizer_file)
    block_size = resolve_block_size(cfg.block_size, tokenizer_file)
    conversations = load_mix(cfg.data, seed=cfg.seed, split=cfg.split, names=cfg.names(),
                             max_examples=cfg.max_examples)
    fit = fit_conversations(tokenizer, conversations, block_size)
    color = sys.stdout.isatty() if cfg.color is None else cfg.color

    print(f"data: {cfg.data} ({len(conversations):,} conversations)")
    print(f"tokenizer: {tokenizer_file} (vocab_size {tokenizer.vocab_size:,})")
    source = f" (the checkpoint's, from {tokenizer_file.parent / MODEL_CONFIG_FILE})" if cfg.block_size == 0 else ""
    print(f"block_size: {block_size:,}{source}")
    legend = "in green" if color else f"between {TRAINED_OPEN} and {TRAINED_CLOSE}"
    print(f"trained tokens (loss mask 1) are shown {legend}; a line break follows each {END_OF_TURN} for reading\n")

    fitted_by_index = dict(zip(fit.kept, fit.examples))
    shown = sorted(random.Random(cfg.seed).sample(range(len(conversations)), min(cfg.num_examples, len(conversations))))
    for number, index in enumerate(shown, start=1):
        title = f"example {number}/{len(shown)}: conversation {index:,} of {len(conversations):,}"
        _print_example(tokenizer, conversations[index], fitted_by_index.get(index), fit.lengths[index], title,
                       block_size, color)

    n = len(conversations)
    counts = {
        "conversations": n,
        "kept": len(fit.examples),
        "turns": sum(len(c) for c in conversations),
        "assistant_turns": sum(m["role"] == "assistant" for c in conversations for m in c),
        "tokens": sum(len(ids) for ids, _ in fit.examples),
        "trained_tokens": sum(sum(mask) for _, mask in fit.examples),
        "truncated": fit.truncated,
        "dropped": fit.dropped,
        "mean_tokens": sum(fit.lengths) / n,
        "max_tokens": max(fit.lengths),
        "block_size": block_size,
    }
    share = counts["trained_tokens"] / max(counts["tokens"], 1)
    print(f"counts at block_size {block_size}")
    print(f"  conversations   {n:,} ({counts['kept']:,} kept)")
    print(f"  turns           {counts['turns']:,} ({counts['assistant_turns']:,} by the assistant)")
    print(f"  tokens          {counts['tokens']:,} in the kept examples")
    print(f"  trained tokens  {counts['trained_tokens']:,} ({share:.1%} of tokens)")
    print(f"  truncated       {fit.truncated:,} ({fit.truncated / n:.1%}): lost turns from the end to fit")
    print(f"  dropped         {fit.dropped:,} ({fit.dropped / n:.1%}): first exchange longer than block_size")
    print(f"  tokens per conversation before fitting: mean {counts['mean_tokens']:,.1f}, max {counts['max_tokens']:,}")
    return counts
