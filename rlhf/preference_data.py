"""Preference pairs for the reward model and DPO: load them, hold some out, and prepare a run's
train and held-out pairs as tokens.

`load_pairs` reads a catalog name, a local file, folder or glob (.jsonl, .json, .parquet,
gzipped or not) or a Hub dataset through `datasets`. Local files are read with
`gpt.records`, as chat data is, so an error names the line of a JSON Lines record. The
records of each file are converted with `rlhf.preference_formats`, in the format of the
file's first record. `prepare_pairs` then
splits the pairs by prompt and fits them into block_size with `rlhf.pair_batches`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError
from huggingface_hub.errors import HFValidationError

from gpt.catalog import CATALOG, DATA_DIR_ENV, catalog_names
from gpt.config import option
from gpt.records import check_has_records, file_format, find_source_files, json_records, jsonl_records, parquet_records
from gpt.tokenizer import Tokenizer
from rlhf.pair_batches import TokenizedPair, tokenize_pairs
from rlhf.preference_formats import LoadStats, PreferencePair, convert_record, detect_format

logger = logging.getLogger(__name__)

# Hub copies of the hh-rlhf splits are folders of one repository; CatalogEntry has no
# field for a folder, so the catalog names map to it here.
HUB_DATA_DIRS = {
    "hh-rlhf-harmless": "harmless-base",
    "hh-rlhf-helpful-base": "helpful-base",
    "hh-rlhf-helpful-online": "helpful-online",
    "hh-rlhf-helpful-rejection-sampled": "helpful-rejection-sampled",
}
# ---------------------------------------------------------------------------------------------
# Reading records


def _hub_records(hub_id: str, config: str | None, data_dir: str | None, split: str) -> Iterator[tuple[str, Any]]:
    try:
        ds = datasets.load_dataset(hub_id, config, data_dir=data_dir, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError, HFValidationError, ValueError) as e:
        names = ", ".join(catalog_names("preference"))
        raise ValueError(f"{hub_id!r} is neither a preference catalog name ({names}) nor a local file or folder, "
                         f"and loading it from the Hugging Face Hub failed: {e}. Check the name, pass a local "
                         f"path, or set {DATA_DIR_ENV} for catalog data.") from e
    label = hub_id + (f" ({data_dir})" if data_dir else "") + f" split {split}"
    for index, row in enumerate(ds):
        yield f"{label}, record {index}", row


def _file_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for each record of one local file; JSON Lines records name their line."""
    readers = {"jsonl": jsonl_records, "json": json_records, "parquet": parquet_records}
    path_format = file_format(path)
    if path_format not in readers:
        raise ValueError(f"{path}: preference data must be .jsonl, .json or .parquet (optionally .gz); plain text "
                         "has no pairs. Convert it to JSON Lines records with prompt, chosen and rejected.")
    if path_format != "parquet":
        check_has_records(path)
    yield from readers[path_format](path)


def _record_streams(source: str, split: str) -> list[Iterator[tuple[str, Any]]]:
    """Return an iterator of (where, record) for each file of `source`, or one for its Hub dataset."""
    files = find_source_files(source, "preference", "preference data")
    if files is not None:
        return [_file_records(path) for path in files]
    entry = CATALOG.get(source)
    if entry is not None:
        return [_hub_records(entry.hub_id, entry.hub_config, HUB_DATA_DIRS.get(source), entry.hub_split)]
    return [_hub_records(source, None, None, split)]


# ---------------------------------------------------------------------------------------------
# Loading pairs


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
            known format, or a bad record (see `rlhf.preference_formats`). The message
            names the file, the record and the fix.
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
