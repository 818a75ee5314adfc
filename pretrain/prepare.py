"""Pretraining data: train the tokenizer and tokenize the corpus into token shards.

The corpus is the documents of one or more sources (catalog names or paths, see
`gpt.data.load_documents`). From each source, whole documents are held out for
validation in a seeded random order, up to `val_fraction` of the source's UTF-8
bytes. So every source is represented in the validation split, and a long book
cannot take it over. The training documents are shuffled with the same seed.
Every document is tokenized with `<|endoftext|>` in front of it, so the shards
are one token stream with a boundary token before each document.

`prepare_shards` writes `train_*.bin`, `val_*.bin` and `meta.json` (see
`gpt.shards.write_shards`) and reuses a folder whose meta.json records the same
tokenizer and corpus settings.

`prepare_run` trains the run's tokenizer.json once and records the data it was
trained on in tokenizer_meta.json beside it: sources, text_field, max_documents and
the requested vocab_size. A later run in the same folder reuses the tokenizer only
when it requests the same values, and raises a ValueError otherwise. seed and
val_fraction are not compared, because they change which documents are held out,
not the corpus.

Limits: reuse compares settings, not file contents. After editing a source file,
delete the shard folder to tokenize it again, and tokenizer.json to train the
tokenizer on the new text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from gpt.config import option
from gpt.data import iter_texts, load_documents
from gpt.files import atomic_write_text
from gpt.shards import META_FILE, read_meta, token_dtype, write_meta, write_shards
from gpt.tokenizer import MIN_VOCAB_SIZE, Tokenizer

logger = logging.getLogger(__name__)

META_FORMAT_VERSION = 1
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_meta.json"


@dataclass
class DataConfig:
    """The pretraining corpus and the tokenizer trained on it."""

    sources: str = option("tinystories,gutenberg-children",
                          "comma-separated catalog names (gpt.catalog.CATALOG) or paths of .txt/.jsonl/.json/.parquet data")
    text_field: str = option("text", "field that holds the text in json, jsonl, parquet and Hub records")
    vocab_size: int = option(8192, "tokenizer vocabulary size, including 256 byte tokens and 6 special tokens")
    val_fraction: float = option(0.02, "fraction of each source's UTF-8 bytes held out for validation, as whole documents")
    seed: int = option(1337, "seed of the validation split and of the training document order")
    num_proc: int = option(os.cpu_count() or 1, "processes used to tokenize the corpus")
    max_documents: int = option(0, "read at most this many documents from each source, for quick runs; 0 reads all")

    def source_list(self) -> list[str]:
        return [s.strip() for s in self.sources.split(",") if s.strip()]

    def problems(self) -> list[str]:
        found = []
        if not self.source_list():
            found.append(f"sources must name at least one catalog entry or path, got {self.sources!r}; "
                         "e.g. sources=tinystories")
        if not self.text_field:
            found.append("text_field must name a field, got an empty string; e.g. text_field=text")
        if not MIN_VOCAB_SIZE <= self.vocab_size <= 2**32:
            found.append(f"vocab_size must be between {MIN_VOCAB_SIZE} (byte and special tokens) and 2**32, "
                         f"got {self.vocab_size}")
        if not 0 < self.val_fraction < 0.5:
            found.append(f"val_fraction must be above 0 and below 0.5, got {self.val_fraction}; e.g. 0.02")
        if self.num_proc < 1:
            found.append(f"num_proc must be 1 or more, got {self.num_proc}")
        if self.max_documents < 0:
            found.append(f"max_documents must be 0 (all) or more, got {self.max_documents}")
        return found


def _corpus_settings(cfg: DataConfig) -> dict:
    """Return the settings that decide the shards' content.

    num_proc does not change the content, and the tokenizer fingerprint already covers vocab_size.
    """
    return {
        "sources": cfg.source_list(),
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "max_documents": cfg.max_documents,
    }


def _byte_lengths(ds: datasets.Dataset) -> np.ndarray:
    return pc.binary_length(ds.with_format("arrow")["text"]).to_numpy(zero_copy_only=False)


def choose_validation(n_bytes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Pick whole documents holding at most `fraction` of the bytes, in a random order.

    Documents that would overshoot the target are skipped, so one long document cannot
    fill the split. At least one document is chosen (the shortest, when none fits) and
    at least one is left for training.

    Args:
        n_bytes: UTF-8 bytes of each document, shape (n_documents,); needs 2 or more.
        fraction: the target share of bytes.
        rng: the random generator that orders the documents.

    Returns:
        The sorted indices of the validation documents.
    """
    assert len(n_bytes) >= 2, "the caller checks that there are 2 or more documents"
    target = fraction * float(n_bytes.sum())
    chosen: list[int] = []
    total = 0
    for index in rng.permutation(len(n_bytes)):
        if len(chosen) == len(n_bytes) - 1:
            break
        if total + n_bytes[index] <= target:
            chosen.append(int(index))
            total += int(n_bytes[index])
    if not chosen:
        chosen = [int(np.argmin(n_bytes))]
    return np.sort(np.array(chosen))


def load_splits(cfg: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Load every source and split it into training and validation documents.

    Returns:
        (train, val): datasets with one "text" column; train is shuffled by `cfg.seed`.

    Raises:
        ValueError: the sources hold fewer than 2 documents in all, or a source fails to load.
    """
    rng = np.random.default_rng(cfg.seed)
    loaded = []
    for source in cfg.source_list():
        docs = load_documents(source, text_field=cfg.text_field)
        if cfg.max_documents and len(docs) > cfg.max_documents:
            docs = docs.select(range(cfg.max_documents))
        loaded.append((source, docs))

    total = sum(len(docs) for _, docs in loaded)
    if total < 2:
        raise ValueError(
            f"sources={cfg.sources!r} hold {total} non-empty document(s); the training and validation splits "
            f"need at least 2. Add documents or sources{', or raise max_documents' if cfg.max_documents else ''}."
        )

    train_parts, val_parts = [], []
    for source, docs in loaded:
        if len(docs) < 2:
            # A one-document source has nothing to hold out, so all of it trains.
            train_parts.append(docs)
            continue
        val_index = choose_validation(_byte_lengths(docs), cfg.val_fraction, rng)
        is_val = np.zeros(len(docs), dtype=bool)
        is_val[val_index] = True
        val_parts.append(docs.select(np.flatnonzero(is_val)))
        train_parts.append(docs.select(np.flatnonzero(~is_val)))
        logger.info("%s: %d documents, %d held out for validation", source, len(docs), len(val_index))

    if not val_parts:
        # Every source has a single document, so one whole source becomes the validation split.
        everything = datasets.concatenate_datasets(train_parts)
        val_index = choose_validation(_byte_lengths(everything), cfg.val_fraction, rng)
        is_val = np.zeros(len(everything), dtype=bool)
        is_val[val_index] = True
        val_parts = [everything.select(np.flatnonzero(is_val))]
        train_parts = [everything.select(np.flatnonzero(~is_val))]

    train = datasets.concatenate_datasets(train_parts).shuffle(seed=cfg.seed)
    val = datasets.concatenate_datasets(val_parts)
    return train, val


def train_tokenizer(cfg: DataConfig, path: str | os.PathLike) -> Tokenizer:
    """Train a tokenizer of `cfg.vocab_size` tokens on the training documents and save it to `path`."""
    train, _ = load_splits(cfg)
    started = time.perf_counter()
    tokenizer = Tokenizer.train(iter_texts(train), cfg.vocab_size)
    tokenizer.save(path)
    logger.info("trained a %d-token tokenizer on %d documents in %.1f s: %s",
                tokenizer.vocab_size, len(train), time.perf_counter() - started, path)
    return tokenizer


@contextlib.contextmanager
def _tokenizers_threads_off() -> Iterator[None]:
    """Turn off the Rust thread pool of `tokenizers` in worker processes forked inside the block.

    A process forked after the pool has run cannot use it; `tokenizers` then turns it off
    and prints a warning. Setting TOKENIZERS_PARALLELISM before the fork makes that choice
    explicit and silent. The parent gets its previous setting back afterwards.
    """
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _tokenize(ds: datasets.Dataset, tokenizer: Tokenizer, num_proc: int, split: str) -> datasets.Dataset:
    """Map documents to token ids, `<|endoftext|>` first, with each document's UTF-8 byte count."""
    eot = tokenizer.eot_id
    features = datasets.Features({
        "ids": datasets.List(datasets.Value(token_dtype(tokenizer.vocab_size).name)),
        "n_bytes": datasets.Value("int64"),
    })

    def tokenize_batch(batch: dict) -> dict:
        texts = batch["text"]
        return {
            "ids": [[eot, *ids] for ids in tokenizer.encode_batch(texts)],
            "n_bytes": [len(text.encode("utf-8")) for text in texts],
        }

    num_proc = min(num_proc, len(ds))
    kwargs = dict(batched=True, batch_size=256, remove_columns=ds.column_names, features=features,
                  desc=f"Tokenizing {split}")
    if num_proc <= 1:
        # One process: encode_batch already spreads each batch over all cores.
        return ds.map(tokenize_batch, **kwargs)
    with _tokenizers_threads_off():
        return ds.map(tokenize_batch, num_proc=num_proc, **kwargs)


def _token_arrays(tokenized: datasets.Dataset) -> Iterator[np.ndarray]:
    for table in tokenized.with_format("arrow").iter(batch_size=1024):
        yield pc.list_flatten(table["ids"]).to_numpy()


def _reusable_meta(out_dir: Path, cfg: DataConfig, tokenizer: Tokenizer) -> dict | None:
    """Return the meta of shards in `out_dir` made from the same corpus settings and tokenizer, else None."""
    try:
        meta = read_meta(out_dir)
    except ValueError:
        return None
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint or meta.get("corpus") != _corpus_settings(cfg):
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        info = meta["splits"].get(split, {})
        paths = [out_dir / name for name in info.get("shards", [])]
        if not paths or not all(p.is_file() for p in paths):
            return None
        if sum(p.stat().st_size for p in paths) != info["tokens"] * itemsize:
            return None
    return meta


def prepare_shards(cfg: DataConfig, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> dict:
    """Tokenize the corpus into train and val shards in `out_dir`, or reuse matching ones.

    Returns:
        The meta dict, also written to meta.json. It has tokenizer_fingerprint, vocab_size,
        dtype, eot_id, sources, corpus (the settings that made the shards) and "splits".
        Each split has documents, tokens (including one `<|endoftext|>` per document),
        bytes (UTF-8 bytes of the text, for bits per byte) and shards (file names).
        "data_dir" is `out_dir`, returned but not stored.
    """
    out_dir = Path(out_dir)
    meta = _reusable_meta(out_dir, cfg, tokenizer)
    if meta is not None:
        logger.info("reusing token shards in %s (tokenizer %s)", out_dir, tokenizer.fingerprint)
        return meta

    started = time.perf_counter()
    train, val = load_splits(cfg)
    # Without meta.json the folder is never reused, so a run killed while writing leaves no
    # mix of old and new shards that could pass for complete.
    (out_dir / META_FILE).unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta = {
        "format_version": META_FORMAT_VERSION,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "eot_id": tokenizer.eot_id,
        "sources": cfg.source_list(),
        "corpus": _corpus_settings(cfg),
        "splits": {},
    }
    for split, docs in zip(SPLITS, (train, val)):
        tokenized = _tokenize(docs, tokenizer, cfg.num_proc, split)
        paths = write_shards(_token_arrays(tokenized), out_dir, split, dtype)
        n_tokens = sum(os.path.getsize(p) for p in paths) // dtype.itemsize
        meta["splits"][split] = {
            "documents": len(docs),
            "tokens": n_tokens,
            "bytes": int(pc.sum(tokenized.with_format("arrow")["n_bytes"]).as_py()),
            "shards": [Path(p).name for p in paths],
        }
    write_meta(out_dir, meta)
    meta["data_dir"] = str(out_dir)

    for split in SPLITS:
        info = meta["splits"][split]
        logger.info("%s: %s documents, %s tokens, %.2f bytes per token", split, f"{info['documents']:,}",
                    f"{info['tokens']:,}", info["bytes"] / max(info["tokens"], 1))
    logger.info("prepared token shards in %s in %.1f s", out_dir, time.perf_counter() - started)
    return meta


def check_shards_match(meta: dict, tokenizer: Tokenizer, data_dir: str | os.PathLike | None = None) -> None:
    """Raise ValueError unless the shards described by `meta` were made with `tokenizer`."""
    folder = data_dir if data_dir is not None else meta.get("data_dir", "the token shard folder")
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise ValueError(
            f"token shards in {folder} were made with tokenizer {meta.get('tokenizer_fingerprint')}, not with the "
            f"tokenizer in use ({tokenizer.fingerprint}). Delete {folder}, or run prepare_shards "
            "again with this tokenizer, which rewrites the shards."
        )
    if meta.get("vocab_size") != tokenizer.vocab_size:
        raise ValueError(
            f"token shards in {folder} record vocab_size {meta.get('vocab_size')}, but the tokenizer has "
            f"{tokenizer.vocab_size} tokens. Delete {folder} and prepare the shards again."
        )


@dataclass
class PrepareConfig:
    """Configuration of `gptlab prepare`."""

    out_dir: str = option("runs/default", "run folder: tokenizer.json, tokenizer_meta.json (the data it was trained on) and data/ (the token shards) are written here")
    data: DataConfig = option(DataConfig, "corpus and tokenizer")

    def problems(self) -> list[str]:
        return [] if self.out_dir else ["out_dir must be a folder path, got an empty string"]


def tokenizer_settings(cfg: DataConfig) -> dict:
    """Return the data settings a run's tokenizer is trained with, as tokenizer_meta.json records them.

    vocab_size is the requested size: a small corpus can give the tokenizer fewer tokens.
    """
    return {
        "sources": cfg.source_list(),
        "text_field": cfg.text_field,
        "max_documents": cfg.max_documents,
        "vocab_size": cfg.vocab_size,
    }


def _read_tokenizer_meta(path: Path, tokenizer_path: Path) -> dict:
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete {tokenizer_path} and {path} to train a new "
                         "tokenizer, or use another out_dir") from e
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} must contain a JSON object of data settings, got a JSON {type(recorded).__name__}; "
                         f"delete {tokenizer_path} and {path} to train a new tokenizer, or use another out_dir")
    return recorded


def reuse_tokenizer(tokenizer_path: Path, cfg: DataConfig) -> Tokenizer:
    """Load the run's existing tokenizer after checking that it was trained on the data `cfg` requests.

    Raises:
        ValueError: tokenizer_meta.json records other data settings than `cfg`, or the
            tokenizer has more tokens than data.vocab_size. The message names both values
            and the fix: another out_dir, or deleting tokenizer.json.
    """
    meta_path = tokenizer_path.with_name(TOKENIZER_META_FILE)
    if meta_path.is_file():
        recorded = _read_tokenizer_meta(meta_path, tokenizer_path)
        requested = tokenizer_settings(cfg)
        changed = [key for key in requested if recorded.get(key) != requested[key]]
        if changed:
            differences = "; ".join(f"data.{key} was {recorded.get(key)!r}, this run requests {requested[key]!r}"
                                    for key in changed)
            raise ValueError(f"{tokenizer_path} was trained on other data than this run requests ({meta_path}: "
                             f"{differences}). Use another out_dir for this data, or delete {tokenizer_path} to "
                             "train a new tokenizer in this folder")
    else:
        logger.warning("%s has no %s beside it, so the data it was trained on cannot be checked; reusing it",
                       tokenizer_path, TOKENIZER_META_FILE)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    # A small corpus can yield fewer tokens than requested, never more.
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer_path} has {tokenizer.vocab_size} tokens but data.vocab_size is "
                         f"{cfg.vocab_size}; use another out_dir, or delete the file to train a new tokenizer")
    logger.info("reusing tokenizer %s (%d tokens)", tokenizer_path, tokenizer.vocab_size)
    return tokenizer


def prepare_run(cfg: DataConfig, out_dir: str | os.PathLike) -> tuple[Tokenizer, Path, dict]:
    """Train or reuse the run's tokenizer, then write or reuse its token shards.

    Returns the tokenizer, the path of tokenizer.json and the shard metadata.

    Raises:
        ValueError: the folder's tokenizer was trained on other data (see `reuse_tokenizer`),
            or the corpus cannot be loaded.
    """
    run_dir = Path(out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if tokenizer_path.exists():
        tokenizer = reuse_tokenizer(tokenizer_path, cfg)
    else:
        # Recorded first: a run killed before the tokenizer is saved leaves no tokenizer.json,
        # so the next run trains again and rewrites the record.
        atomic_write_text(run_dir / TOKENIZER_META_FILE, json.dumps(tokenizer_settings(cfg), indent=2) + "\n")
        tokenizer = train_tokenizer(cfg, tokenizer_path)
    data_dir = run_dir / "data"
    meta = prepare_shards(cfg, tokenizer, data_dir)
    check_shards_match(meta, tokenizer, data_dir)
    return tokenizer, tokenizer_path, meta


def run(cfg: PrepareConfig) -> dict:
    """The `prepare` stage: tokenizer and shards for `cfg.out_dir`, without training."""
    _, tokenizer_path, meta = prepare_run(cfg.data, cfg.out_dir)
    for split in SPLITS:
        info = meta["splits"][split]
        logger.info("%s: %s documents, %s tokens, %s bytes", split, f"{info['documents']:,}",
                    f"{info['tokens']:,}", f"{info['bytes']:,}")
    logger.info("tokenizer: %s; shards: %s", tokenizer_path, Path(cfg.out_dir) / "data")
    return meta
