"""Preference pairs for the reward model and DPO: load them, render both replies after the
same prompt tokens with the chat template, fit them into block_size, and batch them.

A pair is a prompt (a conversation that ends with a user message) and two assistant
replies, chosen and rejected. `load_pairs` reads a catalog name, a local file, folder or
glob (.jsonl, .json, .parquet, gzipped or not) or a Hub dataset through `datasets`, and
detects each file's format from the fields of its first record:

    prompt/chosen/rejected  prompt: a string or a message list; chosen, rejected: strings,
                            one assistant message, or the whole conversation (the prompt
                            messages, then the reply)
    chosen/rejected         no prompt: two message lists, or two HH-RLHF transcripts
                            ("\\n\\nHuman: ... \\n\\nAssistant: ..."), that share every turn
                            before the last reply; those shared turns are the prompt
    alpaca-eval             instruction, output_1, output_2, preference (1 or 2 names the
                            preferred output; 0 or 1.5 is a tie, null no judgment)
    shp                     history, human_ref_A, human_ref_B, labels (1: A preferred)

In an HH-RLHF transcript, consecutive turns of one speaker are joined with a blank line.
In nine pairs of hh-rlhf harmless-base test a side has two turns of one speaker in a
row, some because a "Human:" inside an assistant turn lacks the two newlines before it.
With this rule every pair of that split shares its prompt.

Dropped and counted, not errors: pairs whose two replies are identical, AlpacaEval ties
and missing judgments, and pairs whose replies become identical once cut to block_size.
Errors (ValueError naming the file, the record counted from 0, the field and the fix):
a missing or null field, a field of the wrong type, an empty reply string, a prompt that
does not end with a user message, and a transcript that cannot be split into turns.

NOTE: an empty reply in a judged transcript is kept, so the model learns to end its turn
at once there. Four chosen replies of hh-rlhf harmless-base test are
empty (saying nothing was preferred) and five output_2 values of the AlpacaEval
judgments are. Only the explicit formats (prompt/chosen/rejected, message lists, SHP)
reject an empty reply, where it is most likely a mistake.

Fitting to block_size: when the prompt and the longer reply do not fit, the prompt gets a
budget, the room the longer reply leaves but no less than max_prompt_tokens. It loses
whole turns from its start until it fits the budget, and a last user message that alone
exceeds the budget keeps its end. The replies are then cut to the room left, so a cut
reply has no closing <|end|>.

Batches (`collate_pairs`, `PairBatches`) put the B chosen sequences first and the B
rejected ones after them, one per row, or packed several to a row for DPO.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from huggingface_hub.errors import HFValidationError

from gpt.chat import render_chat, render_prompt, validate_messages
from gpt.config import option
from gpt.data import CATALOG, DATA_DIR_ENV, _data_dir, _expand_local, _file_format, _looks_like_path, resolve_files
from gpt.tokenizer import SPECIAL_TOKENS, Tokenizer

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]

PAD_ID = SPECIAL_TOKENS.index("<|pad|>")
# Hub copies of the hh-rlhf splits are folders of one repository; CatalogEntry has no
# field for a folder, so the catalog names map to it here.
HUB_DATA_DIRS = {
    "hh-rlhf-harmless": "harmless-base",
    "hh-rlhf-helpful-base": "helpful-base",
    "hh-rlhf-helpful-online": "helpful-online",
    "hh-rlhf-helpful-rejection-sampled": "helpful-rejection-sampled",
}
KNOWN_FORMATS = (
    "prompt/chosen/rejected (strings or message lists)",
    "chosen/rejected (message lists or HH-RLHF transcripts sharing all but the last reply)",
    "alpaca-eval (instruction, output_1, output_2, preference)",
    "shp (history, human_ref_A, human_ref_B, labels)",
)
_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PreferencePair:
    """A prompt and two replies to it, the first preferred.

    Attributes:
        prompt: messages that end with a user message.
        chosen: content of the preferred assistant reply.
        rejected: content of the other reply.
        where: the file (or Hub dataset) and record it came from.
    """

    prompt: Messages
    chosen: str
    rejected: str
    where: str = ""


@dataclass
class LoadStats:
    """Counts of one `load_pairs` call."""

    records: int = 0
    pairs: int = 0
    identical: int = 0  # dropped: both replies are the same text
    ties: int = 0  # dropped: the judge preferred neither reply
    no_judgment: int = 0  # dropped: the preference is null
    empty_replies: int = 0  # kept: judged transcripts with an empty reply


# ---------------------------------------------------------------------------------------------
# Reading records


def _hub_records(hub_id: str, config: str | None, data_dir: str | None, split: str) -> Iterator[tuple[str, Any]]:
    try:
        ds = datasets.load_dataset(hub_id, config, data_dir=data_dir, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError, HFValidationError, ValueError) as e:
        names = ", ".join(name for name, entry in CATALOG.items() if entry.kind == "preference")
        raise ValueError(f"{hub_id!r} is neither a preference catalog name ({names}) nor a local file or folder, "
                         f"and loading it from the Hugging Face Hub failed: {e}. Check the name, pass a local "
                         f"path, or set {DATA_DIR_ENV} for catalog data.") from e
    label = hub_id + (f" ({data_dir})" if data_dir else "") + f" split {split}"
    for index, row in enumerate(ds):
        yield f"{label}, record {index}", row


def _file_records(path: str) -> Iterator[tuple[str, Any]]:
    """Rows of one local file through `datasets`; a row's index is its record's index in the file."""
    file_format = _file_format(path)
    if file_format not in _BUILDERS:
        raise ValueError(f"{path}: preference data must be .jsonl, .json or .parquet (optionally .gz); plain text "
                         "has no pairs. Convert it to JSON Lines records with prompt, chosen and rejected.")
    try:
        ds = datasets.load_dataset(_BUILDERS[file_format], data_files=[path], split="train")
    except (DatasetGenerationError, UnicodeDecodeError) as e:
        cause = e.__cause__ or e
        raise ValueError(f"{path}: cannot be read as {file_format} records ({type(cause).__name__}: {cause}). Check "
                         "that the file is valid UTF-8 and holds one JSON object per line (.jsonl), a JSON list of "
                         "objects (.json) or a parquet table.") from e
    for index, row in enumerate(ds):
        yield f"{path}, record {index}", row


def _record_streams(source: str, split: str) -> list[Iterator[tuple[str, Any]]]:
    """Return an iterator of (where, record) for each file of `source`, or one for its Hub dataset."""
    entry = CATALOG.get(source)
    if entry is None:
        files = _expand_local(source)
        if files is None:
            if _looks_like_path(source):
                raise ValueError(f"preference data path {source!r} not found. Check the path, or use a catalog "
                                 f"name: {', '.join(n for n, e in CATALOG.items() if e.kind == 'preference')}.")
            return [_hub_records(source, None, None, split)]
        return [_file_records(path) for path in files]
    if entry.kind != "preference":
        names = ", ".join(name for name, e in CATALOG.items() if e.kind == "preference")
        raise ValueError(f"catalog entry {source!r} is {entry.kind} data, not preference pairs. Preference catalog "
                         f"names: {names}.")
    files = resolve_files(entry)
    if files is not None:
        return [_file_records(path) for path in files]
    if _data_dir() is not None and entry.local:
        raise ValueError(f"catalog entry {source!r}: {DATA_DIR_ENV}={_data_dir()} has no file matching "
                         f"{', '.join(entry.local)}. Point {DATA_DIR_ENV} at the data kit folder"
                         + (f", or unset it to load {entry.hub_id!r} from the Hub." if entry.hub_id else "."))
    if not entry.hub_id:
        raise ValueError(f"catalog entry {source!r} exists only as local files ({', '.join(entry.local)}). Set "
                         f"{DATA_DIR_ENV} to the data kit folder that holds them.")
    return [_hub_records(entry.hub_id, entry.hub_config, HUB_DATA_DIRS.get(source), entry.hub_split)]


# ---------------------------------------------------------------------------------------------
# Converting records to pairs


def _field(record: Mapping, name: str, where: str, fmt: str) -> Any:
    value = record.get(name)
    if value is None:
        present = ", ".join(repr(k) for k, v in record.items() if v is not None) or "none"
        raise ValueError(f"{where}: missing or null field {name!r}, which {fmt} records need (fields present: "
                         f"{present}). Add the field or remove the record.")
    return value


def _string(record: Mapping, name: str, where: str, fmt: str) -> str:
    value = _field(record, name, where, fmt)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__} {value!r:.60}. "
                         "Fix the record or remove it.")
    return value


def _reply_string(record: Mapping, name: str, where: str, fmt: str) -> str:
    reply = _string(record, name, where, fmt)
    if not reply.strip():
        raise ValueError(f"{where}: field {name!r} is an empty reply. Write the reply or remove the record.")
    return reply


def _prompt_messages(value: Any, where: str) -> Messages:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    messages = validate_messages(messages, f"{where}, field 'prompt'")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: field 'prompt' ends with a {messages[-1]['role']} message; a prompt must end "
                         "with the user message that the replies answer. Move the last reply to chosen and rejected.")
    return messages


def _reply_from_messages(value: Any, prompt: Messages, name: str, where: str) -> str:
    """Return the content of a reply given as a message list, with or without the prompt before it."""
    messages = validate_messages([value] if isinstance(value, Mapping) else value, f"{where}, field {name!r}")
    if messages[:len(prompt)] == prompt:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = ", ".join(m["role"] for m in messages) or "none"
        raise ValueError(f"{where}: field {name!r} must hold one assistant reply after the prompt, got the roles "
                         f"[{roles}]. Put the earlier turns in the prompt and keep only the final reply.")
    if not messages[0]["content"].strip():
        raise ValueError(f"{where}: field {name!r} is an empty reply. Write the reply or remove the record.")
    return messages[0]["content"]


def _from_prompt_chosen_rejected(record: Mapping, where: str) -> PreferencePair:
    fmt = "prompt/chosen/rejected"
    prompt = _prompt_messages(_field(record, "prompt", where, fmt), where)
    replies = []
    for name in ("chosen", "rejected"):
        value = _field(record, name, where, fmt)
        replies.append(_reply_string(record, name, where, fmt) if isinstance(value, str)
                       else _reply_from_messages(value, prompt, name, where))
    return PreferencePair(prompt, replies[0], replies[1], where)


def parse_hh_transcript(text: str, where: str, name: str) -> Messages:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    Consecutive turns of one speaker are joined with a blank line, and each turn's text
    is stripped of surrounding whitespace.

    Raises:
        ValueError: the text does not start with a Human or Assistant turn, or has none.
    """
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"{where}: field {name!r} is not an HH-RLHF transcript: it must start with "
                         f"'\\n\\nHuman:' and alternate '\\n\\nHuman:' and '\\n\\nAssistant:' turns, got "
                         f"{text!r:.80}. Fix the text, or give prompt, chosen and rejected as separate fields.")
    messages: Messages = []
    for speaker, turn in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[speaker], turn.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    return messages


def _split_shared_prompt(chosen: Messages, rejected: Messages, where: str) -> tuple[Messages, str, str]:
    """(prompt, chosen reply, rejected reply) of two conversations that differ in their last reply."""
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError(f"{where}: field {name!r} must end with an assistant reply after at least one user "
                             f"message, got the roles [{', '.join(m['role'] for m in messages)}]. Add the reply "
                             "or remove the record.")
    if chosen[:-1] != rejected[:-1]:
        shorter = min(len(chosen), len(rejected)) - 1  # where they differ when one prompt extends the other
        turn = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), shorter)
        raise ValueError(f"{where}: chosen and rejected differ at message {turn}, before their last reply; the two "
                         "must share every message but the last. Give the prompt as its own field, or fix the "
                         "record.")
    if chosen[-2]["role"] != "user":
        raise ValueError(f"{where}: the message before the last reply is a {chosen[-2]['role']} message; the "
                         "replies must answer a user message. Fix the record or remove it.")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _from_chosen_rejected(record: Mapping, where: str, stats: LoadStats) -> PreferencePair:
    fmt = "chosen/rejected"
    chosen, rejected = _field(record, "chosen", where, fmt), _field(record, "rejected", where, fmt)
    if isinstance(chosen, str) and isinstance(rejected, str):
        conversations = [parse_hh_transcript(chosen, where, "chosen"), parse_hh_transcript(rejected, where, "rejected")]
        judged = True
    elif isinstance(chosen, list) and isinstance(rejected, list):
        conversations = [validate_messages(chosen, f"{where}, field 'chosen'"),
                         validate_messages(rejected, f"{where}, field 'rejected'")]
        judged = False
    else:
        raise ValueError(f"{where}: chosen and rejected must both be HH-RLHF transcripts (strings) or both message "
                         f"lists, got {type(chosen).__name__} and {type(rejected).__name__}. Fix the record.")
    prompt, chosen_reply, rejected_reply = _split_shared_prompt(*conversations, where)
    if not chosen_reply.strip() or not rejected_reply.strip():
        if not judged:
            name = "chosen" if not chosen_reply.strip() else "rejected"
            raise ValueError(f"{where}: field {name!r} ends with an empty reply. Write the reply or remove the record.")
        stats.empty_replies += 1
    return PreferencePair(prompt, chosen_reply, rejected_reply, where)


def _from_alpaca_eval(record: Mapping, where: str, stats: LoadStats) -> PreferencePair | None:
    fmt = "alpaca-eval"
    prompt = _prompt_messages(_string(record, "instruction", where, fmt), where)
    outputs = [_string(record, name, where, fmt) for name in ("output_1", "output_2")]
    preference = record.get("preference")
    if preference is None:
        stats.no_judgment += 1
        return None
    try:
        value = float(preference) if not isinstance(preference, bool) else None
    except ValueError:
        value = None
    if value in (0.0, 1.5):
        stats.ties += 1
        return None
    if value not in (1.0, 2.0):
        raise ValueError(f"{where}: field 'preference' is {preference!r}; expected 1 or 2 (the preferred output), "
                         "0 or 1.5 for a tie, or null for no judgment. Fix the record or remove it.")
    stats.empty_replies += not all(output.strip() for output in outputs)
    chosen = 0 if value == 1.0 else 1
    return PreferencePair(prompt, outputs[chosen], outputs[1 - chosen], where)


def _from_shp(record: Mapping, where: str) -> PreferencePair:
    fmt = "shp"
    prompt = _prompt_messages(_string(record, "history", where, fmt), where)
    replies = [_reply_string(record, name, where, fmt) for name in ("human_ref_A", "human_ref_B")]
    label = _field(record, "labels", where, fmt)
    if label not in (0, 1) or isinstance(label, bool):
        raise ValueError(f"{where}: field 'labels' is {label!r}; expected 1 (human_ref_A preferred) or 0 "
                         "(human_ref_B preferred). Fix the record or remove it.")
    return PreferencePair(prompt, replies[0] if label == 1 else replies[1], replies[1] if label == 1 else replies[0],
                          where)


def detect_format(record: Any, where: str) -> str:
    """Name the preference format of a record from its fields (see the module docstring).

    Raises:
        ValueError: the record is not a mapping, or its fields match no known format.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a record with the fields of a preference format, got "
                         f"{type(record).__name__} {record!r:.60}.")
    present = {key for key, value in record.items() if value is not None}
    if {"instruction", "output_1", "output_2"} <= present:
        return "alpaca-eval"
    if {"history", "human_ref_A", "human_ref_B"} <= present:
        return "shp"
    if "prompt" in present and ("chosen" in present or "rejected" in present):
        return "prompt/chosen/rejected"
    if "chosen" in present or "rejected" in present:
        return "chosen/rejected"
    raise ValueError(f"{where}: unrecognised record format; fields present: "
                     f"{', '.join(map(repr, sorted(present))) or 'none'}. Known formats: {'; '.join(KNOWN_FORMATS)}. "
                     "Rename the fields to one of these.")


def convert_record(record: Mapping, fmt: str, where: str, stats: LoadStats) -> PreferencePair | None:
    """Convert one record of format `fmt` to a pair; None (and a count in `stats`) for a dropped one."""
    if fmt == "alpaca-eval":
        pair = _from_alpaca_eval(record, where, stats)
    elif fmt == "shp":
        pair = _from_shp(record, where)
    elif fmt == "prompt/chosen/rejected":
        pair = _from_prompt_chosen_rejected(record, where)
    else:
        pair = _from_chosen_rejected(record, where, stats)
    if pair is not None and pair.chosen == pair.rejected:
        stats.identical += 1
        return None
    return pair


def load_pairs(source: str, *, split: str = "train", max_pairs: int = 0) -> tuple[list[PreferencePair], LoadStats]:
    """Load preference pairs.

    Args:
        source: a preference `CATALOG` name, a local .jsonl, .json or .parquet file (each
            optionally .gz), a folder or glob of them, or a Hub dataset name.
        split: the split of a Hub dataset named directly; catalog entries use their own.
        max_pairs: stop after this many pairs, in file order; 0 loads all.

    Returns:
        (pairs, counts of records read, pairs kept and pairs dropped).

    Raises:
        ValueError: a missing path or catalog file, an unreadable file, a record in no
            known format, or a bad record (see the module docstring). The message names
            the file, the record and the fix.
    """
    if max_pairs < 0:
        raise ValueError(f"max_pairs={max_pairs}; expected 0 (all) or a positive number of pairs.")
    stats = LoadStats()
    pairs: list[PreferencePair] = []
    for records in _record_streams(source, split):
        fmt = None
        for where, record in records:
            fmt = fmt or detect_format(record, where)
            if not isinstance(record, Mapping):
                raise ValueError(f"{where}: expected a record like the file's first one ({fmt}), got {record!r:.60}.")
            stats.records += 1
            pair = convert_record(record, fmt, where, stats)
            if pair is not None:
                pairs.append(pair)
            if max_pairs and len(pairs) >= max_pairs:
                break
        if max_pairs and len(pairs) >= max_pairs:
            break
    stats.pairs = len(pairs)
    if not pairs:
        raise ValueError(f"{source}: no preference pair found in {stats.records} records ({stats.identical} with "
                         f"identical replies, {stats.ties} ties, {stats.no_judgment} without a judgment). "
                         "Check the data.")
    logger.info("%s: %s records, %s pairs; dropped %d with identical replies, %d ties, %d without a judgment; "
                "%d judged pairs have an empty reply (kept)", source, f"{stats.records:,}", f"{stats.pairs:,}",
                stats.identical, stats.ties, stats.no_judgment, stats.empty_replies)
    return pairs, stats


def split_heldout(pairs: Sequence[PreferencePair], fraction: float,
                  seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (train, heldout) by prompt, at random, deterministically by seed.

    Pairs with the same prompt (AlpacaEval judges nine models on each instruction) land
    on one side, so no held-out prompt is trained on. round(fraction * prompts) prompts
    are held out, at least one when fraction > 0 and there are two or more.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout fraction {fraction} must be in [0, 1), for example 0.05.")
    keys = list(dict.fromkeys(json.dumps(pair.prompt) for pair in pairs))
    n_heldout = round(fraction * len(keys))
    if fraction > 0 and n_heldout == 0 and len(keys) >= 2:
        n_heldout = 1
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    held = {keys[i] for i in order[:n_heldout]}
    train = [pair for pair in pairs if json.dumps(pair.prompt) not in held]
    heldout = [pair for pair in pairs if json.dumps(pair.prompt) in held]
    return train, heldout


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
        input_ids (R, T); attention_mask, (R, T) with 0 on padding, or packed a boolean
        (R, 1, T, T); position_ids, None or packed (R, T); reply_mask (R, T), True on
        reply tokens; segments (R, T), the sequence index of each token, -1 on padding;
        n_pairs (B) and n_tokens (real tokens).
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
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        # Padding forms a segment of its own, so each padding query still sees itself (no NaN rows).
        same_segment = segments[:, :, None] == segments[:, None, :]  # (R, T, T)
        batch["attention_mask"] = (same_segment & causal)[:, None]  # (R, 1, T, T)
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


# ---------------------------------------------------------------------------------------------
# The data settings the reward and DPO stages share


@dataclass
class PairDataConfig:
    """Preference data of a reward or DPO run."""

    source: str = option("hh-rlhf-harmless", "preference pairs: a catalog name, a .jsonl/.json/.parquet file, folder or glob, or a Hub dataset")
    max_pairs: int = option(0, "read at most this many pairs, in file order; 0 reads all")
    heldout_fraction: float = option(0.05, "share of the prompts held out for validation metrics (pairs with one prompt stay together)")
    block_size: int = option(0, "maximum tokens of prompt + reply; 0 for the model's block_size, which is also the maximum")
    max_prompt_tokens: int = option(0, "smallest token budget a long prompt is shortened to; replies longer than the rest of block_size are cut. 0 for half of block_size")
    seed: int = option(1337, "seed of the held-out split and the order of pairs")

    def problems(self) -> list[str]:
        found = []
        if not self.source:
            found.append("data.source is empty; name a catalog entry (for example hh-rlhf-harmless) or a file")
        if self.max_pairs < 0:
            found.append(f"data.max_pairs must be 0 (all) or more, got {self.max_pairs}")
        if not 0 <= self.heldout_fraction < 1:
            found.append(f"data.heldout_fraction must be in [0, 1), for example 0.05, got {self.heldout_fraction}")
        if self.block_size < 0:
            found.append(f"data.block_size must be 0 (the model's) or a positive number of tokens, "
                         f"got {self.block_size}")
        if self.max_prompt_tokens < 0:
            found.append(f"data.max_prompt_tokens must be 0 (half of block_size) or more, got {self.max_prompt_tokens}")
        return found


@dataclass
class PreparedPairs:
    """Tokenized train and held-out pairs and the block size they were fitted to."""

    train: list[TokenizedPair] = field(default_factory=list)
    heldout: list[TokenizedPair] = field(default_factory=list)
    block_size: int = 0


def prepare_pairs(cfg: PairDataConfig, tokenizer: Tokenizer, model_block_size: int, model_dir: str) -> PreparedPairs:
    """Load, split and tokenize the pairs of a run, and log their counts.

    Raises:
        ValueError: a block_size above the model's, bad data, or no pair left for training.
    """
    if cfg.block_size > model_block_size:
        raise ValueError(f"data.block_size {cfg.block_size} is larger than the model's block_size {model_block_size} "
                         f"({model_dir}); use {model_block_size} or less, or 0 for the model's")
    block_size = cfg.block_size or model_block_size
    pairs, _ = load_pairs(cfg.source, max_pairs=cfg.max_pairs)
    train_pairs, heldout_pairs = split_heldout(pairs, cfg.heldout_fraction, cfg.seed)
    train, train_stats = tokenize_pairs(tokenizer, train_pairs, block_size, cfg.max_prompt_tokens)
    heldout, heldout_stats = tokenize_pairs(tokenizer, heldout_pairs, block_size, cfg.max_prompt_tokens)
    if not train:
        raise ValueError(f"no training pair left from {cfg.source}: all {len(train_pairs)} have identical replies "
                         f"once cut to block_size {block_size}; raise block_size or data.max_prompt_tokens")
    splits = (("train", train_stats, len(train_pairs)), ("held-out", heldout_stats, len(heldout_pairs)))
    for name, stats, count in splits:
        logger.info("%s pairs at block_size %d: %s of %s kept, %s prompts shortened, %s with a cut reply, %s dropped "
                    "(replies identical once cut)", name, block_size, f"{stats.kept:,}", f"{count:,}",
                    f"{stats.prompt_shortened:,}", f"{stats.replies_cut:,}", f"{stats.identical_after_cut:,}")
    return PreparedPairs(train, heldout, block_size)
