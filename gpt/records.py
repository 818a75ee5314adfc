"""Find the files of a data source and read their records, with errors that name the file and record.

A source is a catalog name (`gpt.catalog.CATALOG`), a local file, folder or glob, or
the name of a Hugging Face Hub dataset. `find_source_files` turns a source into its
local files, or None when it is read from the Hub, and raises a ValueError naming the
fix when neither works. The file type comes from the name: .txt, .jsonl, .json and
.parquet, each optionally gzipped (.gz) except parquet.

`jsonl_records`, `json_records` and `parquet_records` yield (where, record) pairs, where
`where` names the file and the record (and the line of a .jsonl file) for messages
about that record. JSON and JSON Lines files are read with the json module, not
`datasets`, so that a bad record is reported as that record and not as an Arrow
schema error.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetGenerationError

from gpt.catalog import CATALOG, DATA_DIR_ENV, catalog_names, data_dir, missing_files_error, resolve_files

FILE_FORMATS = {
    ".txt": "text", ".txt.gz": "text",
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl",
    ".json": "json", ".json.gz": "json",
    ".parquet": "parquet",
}

Records = Iterable[tuple[str, Any]]  # (where, record): where names the file and record in errors


# ---------------------------------------------------------------------------------------------
# Finding files


def file_format(path: str) -> str | None:
    """Return "text", "jsonl", "json" or "parquet" from the file name, or None for another type."""
    name = path.lower()
    for suffix in sorted(FILE_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FILE_FORMATS[suffix]
    return None


def looks_like_path(source: str) -> bool:
    """Check whether a source that names no file is still meant as a path (not a Hub name)."""
    return (
        file_format(source) is not None
        or any(c in source for c in "*?[")
        or source.startswith((".", "/", "~"))
        or source.endswith("/")
    )


def expand_local(source: str) -> list[str] | None:
    """Return the files a local source names, or None when it names nothing on disk.

    Raises:
        ValueError: `source` is a folder without any data file.
    """
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        # Data folders often keep their license and readme as .txt files beside the data.
        files = sorted(
            str(p) for p in Path(path).rglob("*")
            if p.is_file() and file_format(str(p)) is not None
            and not p.name.upper().startswith(("LICENSE", "README", "."))
        )
        if not files:
            raise ValueError(
                f"folder {path} contains no data file; expected files ending in {', '.join(FILE_FORMATS)}."
            )
        return files
    if os.path.isfile(path):
        return [path]
    if any(c in path for c in "*?["):
        matched = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        return matched or None
    return None


def single_format(files: list[str], source: str) -> str:
    """Return the one file format of `files`.

    Raises:
        ValueError: a file of an unsupported type, or files of several formats.
    """
    formats = {file_format(f) for f in files}
    if None in formats:
        unknown = next(f for f in files if file_format(f) is None)
        raise ValueError(
            f"{unknown}: unsupported file type. Use a file ending in {', '.join(FILE_FORMATS)}."
        )
    if len(formats) > 1:
        raise ValueError(
            f"{source} contains files of several formats ({', '.join(sorted(formats))}); load one format at a "
            f"time, e.g. with a glob such as {source.rstrip('/')}/*.jsonl"
        )
    return formats.pop()


def find_source_files(source: str, kind: str, description: str) -> list[str] | None:
    """Return the local files of a data source of one catalog kind, or None when it is read from the Hub.

    Args:
        source: a catalog name, a local file, folder or glob, or a Hub dataset name.
        kind: the kind a catalog entry must have ("sft", "preference").
        description: what the data is, in messages ("chat data", "preference data").

    Returns:
        The local files in sorted order; None for a Hub dataset name, or for a catalog
        entry that is loaded from the Hub by its hub_id.

    Raises:
        ValueError: a catalog entry of another kind, or one whose files are missing. A catalog
            entry misses its files when they are not under $GPTLAB_DATA_DIR, or when it exists
            only as local files and the variable is unset. Also a path that does not exist.
    """
    entry = CATALOG.get(source)
    names = ", ".join(catalog_names(kind))
    if entry is None:
        files = expand_local(source)
        if files is None and looks_like_path(source):
            raise ValueError(f"{description} path {source!r} not found. Check the path, or use a catalog name: "
                             f"{names}.")
        return files
    if entry.kind != kind:
        raise ValueError(f"catalog entry {source!r} is {entry.kind} data, not {description}. Catalog names of "
                         f"{description}: {names}.")
    files = resolve_files(entry)
    if files is None and data_dir() is not None and entry.local:
        raise missing_files_error(entry)
    if files is None and not entry.hub_id:
        raise ValueError(f"catalog entry {source!r} exists only as local files ({', '.join(entry.local)}). "
                         f"Set {DATA_DIR_ENV} to the data kit folder that contains them.")
    return files


# ---------------------------------------------------------------------------------------------
# Reading records


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8")


def _json_error(path: str, e: json.JSONDecodeError, line: int | None = None) -> ValueError:
    where = f"{path}, line {line if line is not None else e.lineno}"
    return ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}). Fix the JSON or remove the record.")


def check_has_records(path: str) -> None:
    """Raise a ValueError naming `path` when a JSON or JSON Lines file contains only whitespace.

    On such a file `datasets` (5.2) fails with a bare StopIteration, which does not name
    the file.
    """
    # Bytes, not text: a file that is not UTF-8 gets its own error from the reader.
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            if chunk.strip():
                return
    raise ValueError(f"{path} is empty: it has no records. Remove it from the sources, or add records to it.")


def jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for each non-empty line of a JSON Lines file.

    Raises:
        ValueError: a line that is not valid JSON, or invalid UTF-8; the message names the line.
    """
    index = 0
    try:
        with _open_text(path) as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _json_error(path, e, line_number) from e
                yield f"{path}, record {index} (line {line_number})", record
                index += 1
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start}). Save the file as UTF-8.") from e


def json_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, record) for each record of a JSON file: a list of records, an object of records
    keyed by id, or one object.

    Raises:
        ValueError: invalid JSON or UTF-8, or a top-level value that contains no records.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            # json.loads decodes bytes as UTF-8 about twice as fast as reading through a text wrapper.
            content = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise _json_error(path, e) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start}). Save the file as UTF-8.") from e
    if isinstance(content, list):
        for index, record in enumerate(content):
            yield f"{path}, record {index}", record
    elif isinstance(content, dict) and content and all(isinstance(v, dict) for v in content.values()):
        # Records keyed by id, as in the chitchat file.
        for index, (key, record) in enumerate(content.items()):
            yield f"{path}, record {index} (id {key!r})", record
    elif isinstance(content, dict):
        yield f"{path}, record 0", content
    else:
        raise ValueError(f"{path}: expected a JSON list of records or an object of records keyed by id, "
                         f"got a JSON {type(content).__name__}.")


def parquet_records(path: str) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) for each row of a parquet file, read with `datasets`.

    Raises:
        ValueError: the file is not readable as parquet.
    """
    try:
        ds = datasets.load_dataset("parquet", data_files=[path], split="train")
    except DatasetGenerationError as e:
        raise ValueError(f"{path}: not a readable parquet file ({e.__cause__ or e}).") from e
    for index, row in enumerate(ds):
        yield f"{path}, record {index}", row
