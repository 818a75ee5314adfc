"""One entry of the data catalog: a named data set, where its files are and how to read it.

The entries themselves are in gpt/catalog.py and gpt/eval_catalog.py. This module holds
only the record type, so that both of them can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("pretrain", "sft", "preference", "eval")
TXT_DOCUMENT_RULES = ("paragraphs", "file")


@dataclass(frozen=True)
class CatalogEntry:
    """A named data set: where it lives on the Hub and under $GPTLAB_DATA_DIR, and how to read it.

    Attributes:
        name: the catalog key, used as `source` in configs.
        hub_id: Hugging Face Hub dataset id, used when $GPTLAB_DATA_DIR is unset; empty for a
            data set that exists only as the local files.
        hub_config: Hub configuration name, or None.
        hub_split: Hub split to load.
        local: glob patterns relative to $GPTLAB_DATA_DIR; every pattern must match a file.
        text_field: the field that holds the text in json, jsonl, parquet and Hub records.
        kind: "pretrain", "sft", "preference" or "eval".
        license: the license of the data, as an SPDX id or a short phrase.
        gutenberg: strip the Project Gutenberg header and footer from each local file.
        description: what the data is, and how the local files differ from the Hub copy.
        txt_documents: how a local .txt file splits into documents: "paragraphs" (blank
            lines separate documents) or "file" (the whole file is one document).
        document_start: a regular expression; when set, a paragraph that does not match it
            at its start continues the previous document instead of starting one.
    """

    name: str
    hub_id: str
    hub_config: str | None = None
    hub_split: str = "train"
    local: tuple[str, ...] = ()
    text_field: str = "text"
    kind: str = "pretrain"
    license: str = ""
    gutenberg: bool = False
    description: str = ""
    txt_documents: str = "paragraphs"
    document_start: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"catalog entry {self.name!r}: kind={self.kind!r}; expected one of {KINDS}.")
        if self.txt_documents not in TXT_DOCUMENT_RULES:
            raise ValueError(
                f"catalog entry {self.name!r}: txt_documents={self.txt_documents!r}; expected one of {TXT_DOCUMENT_RULES}."
            )
