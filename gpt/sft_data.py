"""Chat data for supervised fine-tuning: load instruction sets as conversations, mix them,
hold some out, and fit each one into block_size tokens.

`load_conversations` reads a catalog name, a local file, folder or glob, or a Hub
dataset, and converts every record to a conversation with `gpt.chat_formats`, which
lists the record formats it detects.

JSON and JSON Lines files are read with the json module, not `datasets`. `datasets`
reads an object keyed by id (the chitchat file) as one row with thousands of columns.
Its Arrow schema also fills absent fields with null and rejects a file whose records
disagree in type, which hides which record is bad. Read directly, every error names the
file, the record (and the line of a .jsonl file), the field and the fix. Parquet files
and Hub datasets are read with `datasets`.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import HFValidationError

from gpt.catalog import CATALOG, DATA_DIR_ENV, catalog_names
from gpt.chat import render_chat
from gpt.chat_formats import Conversation, convert_records
from gpt.records import Records, file_format, find_source_files, json_records, jsonl_records, parquet_records
from gpt.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_NAMES = {"name": "gptlab", "author": "the gptlab developers"}
# Catalog sets whose text contains {{name}} and {{author}} placeholders. Other catalog sets are
# never filled, because code in them can contain the same braces (Jinja, Handlebars).
PLACEHOLDER_SETS = frozenset({"identity"})


# ---------------------------------------------------------------------------------------------
# Reading records


def _hub_records(hub_id: str, config: str | None, split: str, catalog_name: str | None = None) -> Iterator[tuple[str, Any]]:
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError, HFValidationError) as e:
        local_names = ", ".join(name for name, entry in CATALOG.items() if entry.kind == "sft" and entry.local)
        if catalog_name is not None:
            raise ValueError(f"catalog entry {catalog_name!r}: loading {hub_id!r} from the Hugging Face Hub failed: "
                             f"{e}. Connect to the internet, or use a chat set with local files ({local_names}) "
                             f"and set {DATA_DIR_ENV}.") from e
        raise ValueError(
            f"{hub_id!r} is neither a chat catalog name nor a local file or folder, and loading it from the "
            f"Hugging Face Hub failed: {e}. Check the name, pass a local path, or use a catalog name "
            f"({', '.join(catalog_names('sft'))})."
        ) from e
    label = f"{hub_id}" + (f" ({config})" if config else "") + f" split {split}"
    for index, row in enumerate(ds):
        yield f"{label}, record {index}", row


def _local_records(path: str) -> Iterator[tuple[str, Any]]:
    path_format = file_format(path)
    if path_format == "jsonl":
        return jsonl_records(path)
    if path_format == "json":
        return json_records(path)
    if path_format == "parquet":
        return parquet_records(path)
    raise ValueError(f"{path}: chat data must be .json, .jsonl, .json.gz, .jsonl.gz or .parquet; plain text "
                     "has no roles. Convert it to JSON Lines records with a 'messages' list.")


def _record_streams(source: str, split: str) -> list[tuple[str, Records]]:
    """Return (label, records) for each file of `source`, or one pair for a Hub dataset."""
    files = find_source_files(source, "sft", "chat data")
    if files is not None:
        return [(path, _local_records(path)) for path in files]
    entry = CATALOG.get(source)
    if entry is not None:
        return [(entry.hub_id, _hub_records(entry.hub_id, entry.hub_config, entry.hub_split, source))]
    return [(source, _hub_records(source, None, split))]


# ---------------------------------------------------------------------------------------------
# Loading conversations


def fill_placeholders(conversation: Conversation, names: Mapping[str, str]) -> Conversation:
    """Replace each "{{key}}" in the message contents by names[key]; returns a new conversation."""
    pattern = re.compile(r"\{\{(" + "|".join(map(re.escape, names)) + r")\}\}") if names else None
    if pattern is None:
        return [dict(m) for m in conversation]
    return [{**m, "content": pattern.sub(lambda match: names[match.group(1)], m["content"])} for m in conversation]


def load_conversations(source: str, *, split: str = "train", max_examples: int = 0,
                       names: dict[str, str] | None = None) -> list[Conversation]:
    """Load chat or instruction data as conversations.

    Args:
        source: a chat `CATALOG` name (kind "sft"), a local .json, .jsonl, .json.gz,
            .jsonl.gz or .parquet file, a folder or glob of them, or a Hub dataset name.
        split: the split of a Hub dataset; catalog entries use their own hub_split, and
            local files have no splits.
        max_examples: keep the first max_examples conversations, in file order; 0 keeps all.
        names: values for "{{key}}" placeholders. Catalog sets that use placeholders
            (`PLACEHOLDER_SETS`) are filled with `DEFAULT_NAMES` updated by `names`; other
            catalog sets never are. Files and Hub sets named directly are filled only when
            `names` is given.

    Returns:
        Conversations that each end with an assistant turn.

    Raises:
        ValueError: a missing path or catalog file, a file type that is not chat data,
            invalid JSON or UTF-8, or a record in no known format. Also a bad record: a
            missing field, an unknown role, an empty conversation or no assistant turn.
            Messages name the file, the record (and line) and the field.
    """
    if max_examples < 0:
        raise ValueError(f"max_examples={max_examples}; expected 0 (all) or a positive number of conversations.")
    entry = CATALOG.get(source)
    if entry is not None:
        fill = {**DEFAULT_NAMES, **(names or {})} if source in PLACEHOLDER_SETS else None
    else:
        fill = names

    conversations: list[Conversation] = []
    skipped = 0
    for label, records in _record_streams(source, split):
        limit = max_examples - len(conversations) if max_examples else 0
        converted, n_skipped = convert_records(label, records, limit)
        conversations += converted
        skipped += n_skipped
        if max_examples and len(conversations) >= max_examples:
            break
    if skipped:
        logger.info("%s: skipped %d dialogs that have no assistant reply", source, skipped)
    if not conversations:
        raise ValueError(f"{source}: no conversation with an assistant reply found. Check that the data contains "
                         "replies as well as prompts.")
    if fill is not None:
        conversations = [fill_placeholders(c, fill) for c in conversations]
    logger.info("%s: %d conversations", source, len(conversations))
    return conversations


# ---------------------------------------------------------------------------------------------
# Mixes and held-out splits


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """Parse "SOURCE[:WEIGHT],SOURCE[:WEIGHT],..." into (source, weight) pairs, in order.

    A weight scales the number of conversations taken from its source: 0.5 takes a random
    half, 1 (the default) takes every conversation once, and 3 takes every conversation
    three times. A fractional part above 1 adds that fraction of extra copies (2.5: every
    conversation twice, and a random half a third time). A source whose name contains
    ":" followed by "/" or "\\" (a URL, a Windows path) is read as a name, not a weight.

    Raises:
        ValueError: an empty entry, a weight that is not a positive finite number, or a
            source listed twice.
    """
    mix: list[tuple[str, float]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"data mix {spec!r} has an empty entry. Write SOURCE[:WEIGHT] entries separated by "
                             "commas, for example 'gpteacher:0.5,identity:3'.")
        source, weight = part, 1.0
        head, colon, tail = part.rpartition(":")
        if colon and head and not any(c in tail for c in "/\\"):
            try:
                weight = float(tail)
            except ValueError:
                raise ValueError(f"data mix entry {part!r}: weight {tail!r} is not a number. Write "
                                 f"{head}:WEIGHT with WEIGHT > 0, for example {head}:0.5.") from None
            source = head.strip()
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"data mix entry {part!r}: weight {weight} must be a positive number "
                             "(below 1 takes a fraction of the source, above 1 repeats it).")
        if any(source == seen for seen, _ in mix):
            raise ValueError(f"data mix {spec!r} lists {source!r} twice. List it once with the combined weight.")
        mix.append((source, weight))
    return mix


def apply_weight(conversations: Sequence[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    """Take round(weight * n) of n conversations, at least one: whole copies, then a random subset.

    Copies are the same objects, so `split_heldout` can keep them on one side.
    """
    n = len(conversations)
    if n == 0:
        return []
    n_take = max(1, round(weight * n))
    copies, rest = divmod(n_take, n)
    picked = sorted(rng.sample(range(n), rest))
    return [*conversations] * copies + [conversations[i] for i in picked]


def load_mix(spec: str, *, seed: int = 0, split: str = "train", names: dict[str, str] | None = None,
             max_examples: int = 0) -> list[Conversation]:
    """Load a weighted mix of sources (see `parse_mix`): each source in turn, in spec order.

    A single source with no weight loads as `load_conversations` would. The subsets drawn
    for fractional weights depend only on `seed` and the source's name, so adding a source
    to a mix leaves the draws of the others unchanged.

    Args:
        spec: "SOURCE[:WEIGHT],..." with sources as `load_conversations` takes them.
        seed: seed of the random subsets.
        split, names: passed to `load_conversations` for every source.
        max_examples: read at most this many conversations from each source before
            weighting; 0 reads all.

    Returns:
        The conversations of all sources, concatenated in spec order (not shuffled).
    """
    conversations: list[Conversation] = []
    for source, weight in parse_mix(spec):
        loaded = load_conversations(source, split=split, max_examples=max_examples, names=names)
        # A str seed gives the same draws in every run, unlike hash(str), which Python salts per process.
        taken = apply_weight(loaded, weight, random.Random(f"{seed}:{source}"))
        if weight != 1:
            logger.info("%s: weight %g takes %d of %d conversations", source, weight, len(taken), len(loaded))
        conversations += taken
    return conversations


def split_heldout(conversations: Sequence[Conversation], fraction: float,
                  seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """Split conversations into (train, heldout) at random, deterministically by seed.

    The split is drawn over distinct conversation objects, so the copies a repeat weight
    makes (`load_mix`) all land on one side: every copy in train, or one copy in heldout.
    Both parts keep the input order. round(fraction * distinct) conversations are held
    out, at least one when fraction > 0 and there are two or more.

    Raises:
        ValueError: fraction outside [0, 1).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout fraction {fraction} must be in [0, 1), for example 0.05.")
    by_id = {id(c): c for c in conversations}
    distinct = list(by_id)  # object ids in order of first appearance
    n_heldout = round(fraction * len(distinct))
    if fraction > 0 and n_heldout == 0 and len(distinct) >= 2:
        n_heldout = 1
    order = list(range(len(distinct)))
    random.Random(seed).shuffle(order)
    held = {distinct[i] for i in order[:n_heldout]}
    train = [c for c in conversations if id(c) not in held]
    heldout = [by_id[i] for i in distinct if i in held]
    return train, heldout


# ---------------------------------------------------------------------------------------------
# Fitting to block_size


class _MemoEncoder:
    """A tokenizer whose `encode` remembers its results, so rendering several prefixes of one
    conversation encodes each message once. Other attributes come from the wrapped tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._cache[text] = self._tokenizer.encode(text)
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _fit(tokenizer: _MemoEncoder, conversation: Conversation,
         block_size: int) -> tuple[tuple[list[int], list[int]] | None, int]:
    """Return (fitted ids and mask or None, token count of the whole conversation)."""
    ids, mask = render_chat(tokenizer, conversation)
    if len(ids) <= block_size:
        return (ids, mask), len(ids)
    # Prefixes that end with an assistant turn, shortest first. A prefix of the messages
    # renders to a prefix of the ids, so lengths grow with the index: binary search it.
    ends = [i + 1 for i, message in enumerate(conversation) if message["role"] == "assistant"][:-1]
    best = None
    low, high = 0, len(ends) - 1
    while low <= high:
        middle = (low + high) // 2
        prefix_ids, prefix_mask = render_chat(tokenizer, conversation[:ends[middle]])
        if len(prefix_ids) <= block_size:
            best = (prefix_ids, prefix_mask)
            low = middle + 1
        else:
            high = middle - 1
    return best, len(ids)


def fit_to_block(tokenizer: Tokenizer, conversation: Conversation, block_size: int) -> tuple[list[int], list[int]] | None:
    """Render a conversation with `render_chat` into at most block_size tokens.

    A conversation that is too long loses whole messages from the end, down to the
    longest prefix that ends with an assistant turn and fits.

    Returns:
        (ids, mask) of at most block_size tokens, or None when even the messages up to the
        first assistant turn do not fit (the caller drops the conversation).
    """
    return _fit(_MemoEncoder(tokenizer), conversation, block_size)[0]


@dataclass
class FitResult:
    """Conversations rendered and fitted to block_size, with counts for reporting.

    Attributes:
        examples: (ids, mask) of every conversation kept, in input order.
        kept: the input index of each example.
        lengths: the token count of every input conversation rendered whole.
        truncated: conversations kept after losing turns from the end.
        dropped: conversations whose first exchange does not fit.
    """

    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def fit_conversations(tokenizer: Tokenizer, conversations: Sequence[Conversation], block_size: int) -> FitResult:
    """Apply `fit_to_block` to every conversation and count the truncated and dropped ones."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; expected a positive number of tokens.")
    result = FitResult()
    for index, conversation in enumerate(conversations):
        fitted, length = _fit(_MemoEncoder(tokenizer), conversation, block_size)
        result.lengths.append(length)
        if fitted is None:
            result.dropped += 1
            continue
        result.truncated += len(fitted[0]) < length
        result.examples.append(fitted)
        result.kept.append(index)
    return result
