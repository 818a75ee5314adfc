"""Pretraining documents: load a corpus by catalog name, local path or Hub name with `datasets`.

`load_documents` turns a catalog name (`gpt.catalog.CATALOG`), a local path or a Hub
name into a `datasets.Dataset` with one "text" column and one row per document. Bad
input (a missing file, invalid UTF-8 or JSON, a missing field, an empty corpus)
raises a ValueError that names the file, the line or record and the fix.
`strip_gutenberg` removes the Project Gutenberg header and license from a book.

Limits: local text files are read with universal newlines, so "\\r\\n" in a
.txt file becomes "\\n". Paragraph and story boundaries of plain-text corpora are
found with simple rules (blank lines, a regular expression for story openings),
not by parsing.
"""

from __future__ import annotations

import codecs
import difflib
import gzip
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.exceptions import DatasetGenerationError, DatasetNotFoundError
from huggingface_hub.errors import HFValidationError

from gpt.catalog import CATALOG, DATA_DIR_ENV, data_dir, missing_files_error, resolve_files
from gpt.records import check_has_records, expand_local, looks_like_path, single_format

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate

# The header ends with the START marker; 1990s files have no START marker and end their header
# with the license ("*END*THE SMALL PRINT!..."). A START marker wrapped over two lines ends with a
# line that is only "***".
_GUTENBERG_START = re.compile(
    r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*(?:\n\*{3}[ \t]*$)?"
    r"|^\*END\*? ?THE SMALL PRINT[^\n]*",
    re.IGNORECASE | re.MULTILINE,
)
# The footer opens with a closing line ("End of the Project Gutenberg EBook of ...",
# "End of Project Gutenberg's ...", "End Project Gutenberg etext of ...", or a bare
# "*Project Gutenberg Etext of ...*") or directly with the END marker.
_GUTENBERG_END = re.compile(
    r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG"
    r"|^End of (?:the )?Project Gutenberg"
    r"|^End Project Gutenberg"
    r"|^\*?(?:The )?Project Gutenberg(?:'s|’s)? E(?:text|book) of",
    re.IGNORECASE | re.MULTILINE,
)
# Paragraphs at the top of the body that are about the e-book, not part of the book.
_PRODUCTION_NOTE = re.compile(
    r"\A\s*(?:Produced by|E-?text prepared by|This e-?text was prepared|Note: Project Gutenberg"
    r"|Images of the original pages)[^\n]*(?:\n[ \t]*\S[^\n]*)*",
    re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header, license footer and production notes from a book.

    Returns the text between the header's end marker and the footer's first line, with
    surrounding whitespace removed. Text without a recognized header marker is returned
    unchanged, because cutting at a guessed place could drop the book.
    """
    start = _GUTENBERG_START.search(text)
    if start is None:
        return text
    end = _GUTENBERG_END.search(text, start.end())
    body = text[start.end(): end.start() if end else len(text)]
    while note := _PRODUCTION_NOTE.match(body):
        body = body[note.end():]
    return body.strip()


# ---------------------------------------------------------------------------------------------
# Loading files

_BUILDERS = {"text": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def _open_text(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read()


def _find_invalid_utf8(path: str) -> int | None:
    """Return the byte offset (in the decompressed data) of the first invalid UTF-8 byte, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.endswith(".gz") else open
    consumed = 0
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                return consumed - pending + e.start
            consumed += len(chunk)
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return consumed - pending + e.start
    return None


def _check_record(record: Any, field: str, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, expected an object with a {field!r} field.")
    if record.get(field) is None:
        fields = ", ".join(repr(k) for k in record) or "none"
        raise ValueError(
            f"{where} lacks the field {field!r}; its fields are {fields}. "
            f"Pass text_field naming the field that holds the text, or fix the record."
        )
    if not isinstance(record[field], str):
        raise ValueError(
            f"{where}: field {field!r} is a {type(record[field]).__name__}, expected a string. "
            "Pass text_field naming a string field."
        )


def _diagnose(files: list[str], file_format: str, field: str) -> None:
    """Raise a ValueError naming the first bad file, line or record; return when every record is valid."""
    for path in files:
        if file_format != "parquet":
            offset = _find_invalid_utf8(path)
            if offset is not None:
                raise ValueError(
                    f"{path}: invalid UTF-8 at byte {offset}"
                    f"{' of the decompressed data' if path.endswith('.gz') else ''}. "
                    "Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                )
        if file_format == "jsonl":
            text = _open_text(path).decode("utf-8")
            for line_number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}, line {line_number}: not valid JSON ({e.msg}, column {e.colno}). "
                        "Each line of a .jsonl file must be one JSON object: fix or remove the line."
                    ) from e
                _check_record(record, field, f"{path}, line {line_number}")
        elif file_format == "json":
            try:
                content = json.loads(_open_text(path).decode("utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
                    "Fix the file; a .json file must hold one JSON list of records."
                ) from e
            if not isinstance(content, list):
                raise ValueError(
                    f"{path}: the top-level JSON value is a {type(content).__name__}, expected a list of "
                    "records. Convert it to a list of objects, or to .jsonl with one object per line."
                )
            for index, record in enumerate(content):
                _check_record(record, field, f"{path}, record {index}")
        elif file_format == "parquet":
            names = pq.read_schema(path).names
            if field not in names:
                raise ValueError(
                    f"{path}: no column {field!r}; its columns are {', '.join(map(repr, names))}. "
                    "Pass text_field naming the column that holds the text."
                )
            column = pq.read_table(path, columns=[field]).column(field)
            if column.null_count:
                index = next(i for i, value in enumerate(column.to_pylist()) if value is None)
                raise ValueError(f"{path}, record {index}: column {field!r} is null. Fill or drop the record.")


def _is_valid_text_column(ds: datasets.Dataset, field: str) -> bool:
    if field not in ds.column_names:
        return False
    if getattr(ds.features[field], "dtype", None) not in ("string", "large_string"):
        return False
    column = ds.data.column(field)
    if column.null_count:
        return False
    # The json builder (datasets 5.2, pyarrow 26) loads invalid UTF-8 into string columns without an error.
    try:
        column.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _load_local(files: list[str], file_format: str, field: str, source: str) -> datasets.Dataset:
    builder_kwargs: dict[str, Any] = {}
    if file_format == "text":
        # utf-8-sig drops a leading byte order mark, which some Project Gutenberg files have.
        builder_kwargs = {"sample_by": "document", "encoding": "utf-8-sig"}
    if file_format in ("json", "jsonl"):
        for path in files:
            check_has_records(path)
    try:
        ds = datasets.load_dataset(_BUILDERS[file_format], data_files=files, split="train", **builder_kwargs)
    # The json builder lets UnicodeDecodeError through unwrapped (datasets 5.2).
    except (DatasetGenerationError, UnicodeDecodeError):
        _diagnose(files, file_format, field)
        raise  # The diagnosis found no fault in the input, so the datasets error stands.
    if file_format == "text":
        return ds

    if not _is_valid_text_column(ds, field):
        _diagnose(files, file_format, field)
        raise ValueError(
            f"{source}: field {field!r} is missing or not a string in some records "
            f"(columns: {', '.join(ds.column_names)}). Pass text_field naming a string field."
        )
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def _load_hub(hub_id: str, config: str | None, split: str, field: str) -> datasets.Dataset:
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except (ConnectionError, DatasetNotFoundError, FileNotFoundError, HFValidationError) as e:
        close = difflib.get_close_matches(hub_id, CATALOG, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        fix = "Check the name, or pass a local path." if data_dir() else \
            f"Check the name, pass a local path, or set {DATA_DIR_ENV} for catalog data."
        raise ValueError(
            f"{hub_id!r} is neither a catalog name ({', '.join(CATALOG)}) nor a local file or folder, and "
            f"loading it from the Hugging Face Hub failed: {e}. {hint}{fix}"
        ) from e
    if field not in ds.column_names:
        raise ValueError(
            f"Hub dataset {hub_id!r} (split {split!r}) has no field {field!r}; its fields are "
            f"{', '.join(ds.column_names)}. Pass text_field naming the field that holds the text."
        )
    return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])


def _split_documents(texts: list[str], rule: str, start: re.Pattern | None, gutenberg: bool) -> list[str]:
    """Split whole-file texts into documents by the catalog entry's rule."""
    documents: list[str] = []
    for text in texts:
        if gutenberg:
            text = strip_gutenberg(text)
        if rule == "file":
            documents.append(text.strip())
            continue
        current: list[str] = []
        for paragraph in _PARAGRAPH_BREAK.split(text):
            paragraph = paragraph.lstrip("\n").rstrip()
            if not paragraph:
                continue
            if current and (start is None or start.match(paragraph)):
                documents.append("\n\n".join(current))
                current = []
            current.append(paragraph)
        if current:
            documents.append("\n\n".join(current))
    return documents


def load_documents(source: str, text_field: str = "text", split: str = "train") -> datasets.Dataset:
    """Load a corpus as one "text" column with one row per document.

    Args:
        source: a `CATALOG` name, a Hub dataset name, or a local file, folder or glob.
            Local files end in .txt, .txt.gz, .jsonl, .jsonl.gz, .json or .parquet, all
            files of one source in the same format.
        text_field: the field holding the text in json, jsonl, parquet and Hub records
            (a catalog entry's own text_field is used for catalog names).
        split: the split of a Hub dataset; catalog entries use their hub_split, and
            local files have no splits.

    Returns:
        A `datasets.Dataset` with the single column "text". Local .txt files are split into
        documents at blank lines, or by the catalog entry's rule; empty documents are dropped.

    Raises:
        ValueError: a missing path or catalog file, an unsupported file type, invalid UTF-8,
            a .jsonl line that is not JSON, a record without `text_field`, or no non-empty document.
    """
    entry = CATALOG.get(source)
    files: list[str] | None = None
    if entry is not None:
        text_field = entry.text_field
        files = resolve_files(entry)
        if files is None and data_dir() is not None and entry.local:
            raise missing_files_error(entry)
    else:
        files = expand_local(source)
        if files is None and looks_like_path(source):
            raise ValueError(
                f"data path {source!r} not found (resolved to {os.path.abspath(os.path.expanduser(source))}). "
                f"Check the path, or use a catalog name: {', '.join(CATALOG)}."
            )

    if files is None:
        if entry is not None:
            ds = _load_hub(entry.hub_id, entry.hub_config, entry.hub_split, text_field)
        else:
            ds = _load_hub(source, None, split, text_field)
        if entry is not None and entry.gutenberg:
            ds = ds.map(lambda batch: {"text": [strip_gutenberg(t) for t in batch["text"]]}, batched=True)
    else:
        file_format = single_format(files, source)
        ds = _load_local(files, file_format, text_field, source)
        if file_format == "text":
            rule = entry.txt_documents if entry else "paragraphs"
            start = re.compile(entry.document_start) if entry and entry.document_start else None
            gutenberg = bool(entry and entry.gutenberg)
            ds = ds.map(
                lambda batch: {"text": _split_documents(batch["text"], rule, start, gutenberg)},
                batched=True, batch_size=16, remove_columns=ds.column_names, desc=f"Splitting {source} into documents",
            )

    ds = ds.filter(lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        where = source
        if files:
            where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
        raise ValueError(
            f"{source}: no non-empty document in {where}. Check that the files hold text "
            f"(and, for json/jsonl/parquet, that {text_field!r} is the field with the text)."
        )
    return ds


def iter_texts(ds: datasets.Dataset, batch_size: int = 1000) -> Iterator[str]:
    """Yield the "text" column of a dataset, reading it in batches."""
    for batch in ds.iter(batch_size=batch_size):
        yield from batch["text"]
