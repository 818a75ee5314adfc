"""Token shards on disk: the tokenized pretraining corpus as memory-mapped arrays.

A shard folder contains raw little-endian arrays `{split}_{index:04d}.bin` (uint16 when
vocab_size <= 65536, else uint32) and a `meta.json` that describes them.
`write_shards` writes a stream of token arrays, `write_meta` and `read_meta` the
description, and `TokenShards` reads a split back through read-only memory maps.
pretrain/prepare.py decides what goes into the shards.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from gpt.files import atomic_write_text

META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype for token ids: uint16 up to 65536 tokens, else uint32."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} is out of range; expected 1..{2**32}.")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _shard_name(split: str, index: int) -> str:
    return f"{split}_{index:04d}.bin"


def write_shards(token_arrays: Iterable[np.ndarray], out_dir: str | os.PathLike, split: str, dtype: Any,
                 shard_tokens: int = 100_000_000) -> list[str]:
    """Write a stream of token arrays as `{split}_{index:04d}.bin` files of at most `shard_tokens` tokens.

    Arrays are concatenated in order and cut at shard boundaries, so a document may span two
    shards. Each shard is written to a temporary name and renamed when complete; shards of
    the same split left from an earlier run are deleted first.

    Args:
        token_arrays: 1-D integer arrays; values must fit `dtype`.
        out_dir: the folder to write to (created if needed).
        split: the split name, e.g. "train" or "val".
        dtype: numpy dtype of the files (see `token_dtype`).
        shard_tokens: the maximum number of tokens per file.

    Returns:
        The paths of the written shards, in order.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens={shard_tokens}; expected a positive number of tokens per shard.")
    dtype = np.dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{glob.escape(split)}_[0-9][0-9][0-9][0-9].bin"):
        stale.unlink()

    paths: list[str] = []
    handle = None
    tmp_path = ""
    in_shard = 0

    def close_shard() -> None:
        handle.close()
        final = out_dir / _shard_name(split, len(paths))
        os.replace(tmp_path, final)
        paths.append(str(final))

    try:
        for array in token_arrays:
            array = np.asarray(array)
            if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
                raise ValueError(f"token ids range {array.min()}..{array.max()}, which does not fit {dtype}.")
            array = array.astype(dtype, copy=False)
            while array.size:
                if handle is None:
                    fd, tmp_path = tempfile.mkstemp(prefix=f".{split}.", suffix=".tmp", dir=out_dir)
                    handle = os.fdopen(fd, "wb")
                    in_shard = 0
                take = min(array.size, shard_tokens - in_shard)
                array[:take].tofile(handle)
                in_shard += take
                array = array[take:]
                if in_shard == shard_tokens:
                    close_shard()
                    handle = None
        if handle is not None:
            close_shard()
            handle = None
    finally:
        if handle is not None:
            handle.close()
            os.unlink(tmp_path)
    return paths


def write_meta(data_dir: str | os.PathLike, meta: dict) -> None:
    """Write meta.json atomically (temporary file, then rename)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stored = {k: v for k, v in meta.items() if k != "data_dir"}
    atomic_write_text(data_dir / META_FILE, json.dumps(stored, indent=2) + "\n")


def read_meta(data_dir: str | os.PathLike) -> dict:
    """Read meta.json of a shard folder. The returned dict also contains "data_dir", the folder it came from.

    Raises:
        ValueError: the folder or its meta.json is missing or unreadable.
    """
    data_dir = Path(data_dir)
    path = data_dir / META_FILE
    if not path.is_file():
        reason = "does not exist" if not data_dir.is_dir() else f"has no {META_FILE}"
        raise ValueError(
            f"token shard folder {data_dir} {reason}. Create it with pretrain.prepare.prepare_shards "
            "(gptlab pretrain does this before training)."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete {data_dir} and prepare the shards again.") from e
    meta["data_dir"] = str(data_dir)
    return meta


class TokenShards:
    """The token shards of one split, read-only memory-mapped, indexed as one 1-D sequence.

    `len(shards)` is the total number of tokens; `shards[i]` and `shards[a:b]` (step 1) read
    across shard boundaries. `tokens` is the memmap itself when the split has one shard.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, dtype: Any = None) -> None:
        data_dir = Path(data_dir)
        if dtype is None:
            dtype = read_meta(data_dir)["dtype"]
        self.dtype = np.dtype(dtype)
        self.paths = sorted(str(p) for p in data_dir.glob(f"{glob.escape(split)}_[0-9][0-9][0-9][0-9].bin"))
        if not self.paths:
            raise ValueError(
                f"no {split} shards ({_shard_name(split, 0)}, ...) in {data_dir}. Prepare the shards again "
                "with pretrain.prepare.prepare_shards."
            )
        # np.memmap fails on an empty file, and write_shards never writes one.
        self.shards = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> np.ndarray | TokenShards:
        """All tokens as one 1-D sequence: the memmap when there is one shard, else this object."""
        return self.shards[0] if len(self.shards) == 1 else self

    def __getitem__(self, index: int | slice) -> Any:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise ValueError(f"TokenShards supports slices with step 1 only, got step {step}.")
            return self._read(start, max(start, stop))
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.shards[shard][index - self.offsets[shard]]

    def _read(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        position = start
        shard = max(first, 0)
        while position < stop:
            local_start = position - self.offsets[shard]
            local_stop = min(stop, self.offsets[shard + 1]) - self.offsets[shard]
            pieces.append(self.shards[shard][local_start:local_stop])
            position = self.offsets[shard] + local_stop
            shard += 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)
