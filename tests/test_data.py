"""Tests for gpt.catalog, gpt.data, gpt.shards and pretrain.prepare: catalog, document loading,
bad input, token shards, shard preparation and the run folder's tokenizer."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt.catalog import CATALOG, DATA_DIR_ENV, resolve_files
from gpt.data import load_documents, strip_gutenberg
from gpt.shards import TokenShards, read_meta, token_dtype, write_meta, write_shards
from gpt.tokenizer import Tokenizer
from gptlab.cli import main
from pretrain import prepare
from pretrain.prepare import DataConfig, check_shards_match, choose_validation, prepare_shards, train_tokenizer

DATA_DIR = os.environ.get(DATA_DIR_ENV)
needs_data = pytest.mark.skipif(not DATA_DIR, reason=f"{DATA_DIR_ENV} is not set; point it at the data kit")
GUTENBERG_BOOKS = sorted(glob.glob(os.path.join(DATA_DIR, "pretrain/gutenberg-children/pg*.txt.gz"))) if DATA_DIR else []


def texts(ds) -> list[str]:
    return list(ds["text"])


# ---------------------------------------------------------------------------------------------
# Catalog


@needs_data
@pytest.mark.parametrize("name, n_files", [("tinystories", 2), ("gutenberg-children", 104), ("tinyshakespeare", 1)])
def test_catalog_resolves_local(name, n_files):
    files = resolve_files(CATALOG[name])
    assert files is not None
    assert len(files) == n_files
    assert all(Path(f).is_file() for f in files)


def test_catalog_without_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_files(CATALOG["tinystories"]) is None


def test_catalog_entries_valid():
    for name, entry in CATALOG.items():
        assert entry.name == name
        assert entry.kind in ("pretrain", "sft", "preference", "eval")
        assert entry.hub_id or entry.local


def test_catalog_files_missing(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=rf"no file matching pretrain/tinystories/\*\.txt\.gz \(searched under {tmp_path}\)"):
        load_documents("tinystories")


@needs_data
def test_tinystories_documents():
    docs = texts(load_documents("tinystories"))
    assert 900 < len(docs) < 1300
    assert max(len(d) for d in docs) < 10_000
    assert sum(d.startswith("Once upon a time") for d in docs) > 800
    assert all(d == d.strip() for d in docs)


@needs_data
def test_tinyshakespeare_documents():
    docs = texts(load_documents("tinyshakespeare"))
    assert len(docs) > 5000
    assert docs[0].startswith("First Citizen:")


@needs_data
def test_gutenberg_one_document_per_book():
    docs = texts(load_documents("gutenberg-children"))
    assert len(docs) == 104
    assert not any("Project Gutenberg" in d for d in docs)


# ---------------------------------------------------------------------------------------------
# Project Gutenberg boilerplate


@pytest.mark.parametrize("path", GUTENBERG_BOOKS, ids=[Path(p).name.split("_")[0] for p in GUTENBERG_BOOKS])
def test_gutenberg_book_stripped(path):
    raw = gzip.open(path, "rt", encoding="utf-8").read()
    book = strip_gutenberg(raw)
    assert not re.search(r"project gutenberg", book, re.IGNORECASE)
    assert "SMALL PRINT!" not in book.upper()
    assert len(book) > 2000
    assert len(book) > 0.15 * len(raw)
    assert book in raw


@needs_data
def test_gutenberg_keeps_text():
    folder = Path(DATA_DIR) / "pretrain" / "gutenberg-children"
    alice = strip_gutenberg(gzip.open(folder / "pg11_Alice-s-Adventures-in-Wonderland.txt.gz", "rt").read())
    peter = strip_gutenberg(gzip.open(folder / "pg14838_The-Tale-of-Peter-Rabbit.txt.gz", "rt").read())
    assert "Alice was beginning to get very tired" in alice
    assert alice.rstrip().endswith("THE END")
    assert "Once upon a time there were four little Rabbits" in peter
    assert "blackberries for supper" in peter


def test_strip_gutenberg_modern():
    text = ("The Project Gutenberg eBook of X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
            "Produced by Someone\n\nChapter 1\n\nThe story.\n\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
            "Section 1. General Terms of Use\n")
    assert strip_gutenberg(text) == "Chapter 1\n\nThe story."


def test_strip_gutenberg_wrapped_start_marker():
    text = "header\n*** START OF THIS PROJECT GUTENBERG EBOOK A LONG\n***\n\nBody.\n\nEnd of Project Gutenberg's A\n"
    assert strip_gutenberg(text) == "Body."


def test_strip_gutenberg_small_print():
    text = ("**The Project Gutenberg Etext of Y**\nlicense\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*"
            "\n\nThe book.\n\nEnd of The Project Gutenberg Etext of Y\n")
    assert strip_gutenberg(text) == "The book."


def test_strip_gutenberg_no_markers():
    assert strip_gutenberg("Just a story.\n") == "Just a story.\n"


# ---------------------------------------------------------------------------------------------
# Formats

RECORDS = [{"text": "First document.", "id": 1}, {"text": "Second\n\ndocument.", "id": 2}]
EXPECTED = ["First document.", "Second\n\ndocument."]


def write_jsonl(path: Path, records, compress=False):
    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)


def test_load_txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Doc one line one.\nline two.\n\n\n  \nDoc two.\n\nDoc three.\n", encoding="utf-8")
    assert texts(load_documents(str(path))) == ["Doc one line one.\nline two.", "Doc two.", "Doc three."]


def test_load_txt_gz(tmp_path):
    path = tmp_path / "corpus.txt.gz"
    path.write_bytes(gzip.compress("Alpha.\n\nBeta 日本.\n".encode("utf-8")))
    assert texts(load_documents(str(path))) == ["Alpha.", "Beta 日本."]


def test_load_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, RECORDS)
    assert texts(load_documents(str(path))) == EXPECTED


def test_load_jsonl_gz(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    write_jsonl(path, RECORDS, compress=True)
    assert texts(load_documents(str(path))) == EXPECTED


def test_load_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert texts(load_documents(str(path))) == EXPECTED


def test_load_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    assert texts(load_documents(str(path))) == EXPECTED


def test_load_other_field(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"body": "A."}, {"body": "B."}])
    ds = load_documents(str(path), text_field="body")
    assert ds.column_names == ["text"]
    assert texts(ds) == ["A.", "B."]


def test_load_folder_and_glob(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", RECORDS[:1])
    write_jsonl(tmp_path / "b.jsonl", RECORDS[1:])
    assert texts(load_documents(str(tmp_path))) == EXPECTED
    assert texts(load_documents(str(tmp_path / "*.jsonl"))) == EXPECTED


def test_folder_skips_license(tmp_path):
    (tmp_path / "LICENSE.txt").write_text("Permission is hereby granted\n", encoding="utf-8")
    (tmp_path / "stories.txt").write_text("A story.\n", encoding="utf-8")
    assert texts(load_documents(str(tmp_path))) == ["A story."]


def test_txt_byte_order_mark_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffFirst.\n\nSecond.\n".encode("utf-8"))
    assert texts(load_documents(str(path))) == ["First.", "Second."]


def test_empty_documents_dropped(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, [{"text": "kept"}, {"text": "   \n"}, {"text": ""}])
    assert texts(load_documents(str(path))) == ["kept"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_path(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(ValueError, match=f"data path '{path}' not found"):
        load_documents(str(path))


def test_glob_matches_nothing(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_documents(str(tmp_path / "*.txt"))


def test_empty_corpus(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n   \n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"no non-empty document in {path}"):
        load_documents(str(path))


def test_jsonl_invalid_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}, line 2: not valid JSON"):
        load_documents(str(path))


def test_jsonl_missing_field(tmp_path):
    path = tmp_path / "nofield.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(ValueError, match=rf"{path}, line 2 lacks the field 'text'; its fields are 'body', 'title'"):
        load_documents(str(path))


def test_jsonl_field_absent_everywhere(tmp_path):
    path = tmp_path / "other.jsonl"
    write_jsonl(path, [{"prompt": "a"}])
    with pytest.raises(ValueError, match=rf"{path}, line 1 lacks the field 'text'; its fields are 'prompt'"):
        load_documents(str(path))


def test_jsonl_field_not_string(tmp_path):
    path = tmp_path / "list.jsonl"
    write_jsonl(path, [{"text": ["a", "b"]}])
    with pytest.raises(ValueError, match=rf"{path}, line 1: field 'text' is a list, expected a string"):
        load_documents(str(path))


def test_json_missing_field(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([{"text": "a"}, {"body": "b"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}, record 1 lacks the field 'text'; its fields are 'body'"):
        load_documents(str(path))


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "a"}]), path)
    with pytest.raises(ValueError, match=rf"{path}: no column 'text'; its columns are 'body'"):
        load_documents(str(path))


def test_txt_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 at byte 7\. Convert the file to UTF-8"):
        load_documents(str(path))


def test_txt_gz_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt.gz"
    path.write_bytes(gzip.compress(b"ok\n\xff"))
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 at byte 3 of the decompressed data"):
        load_documents(str(path))


def test_txt_truncated_character(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ab🐉".encode("utf-8")[:-1])
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 at byte 2\."):
        load_documents(str(path))


def test_jsonl_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{path}: invalid UTF-8 at byte 13"):
        load_documents(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: unsupported file type"):
        load_documents(str(path))


def test_mixed_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", RECORDS)
    with pytest.raises(ValueError, match="contains files of several formats"):
        load_documents(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Token shards


def test_token_dtype():
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("dtype, high", [(np.uint16, 2**16), (np.uint32, 2**32)])
def test_shards_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, high, size=n, dtype=np.int64) for n in (5, 17, 0, 30)]
    paths = write_shards(iter(arrays), tmp_path, "train", dtype, shard_tokens=16)
    expected = np.concatenate(arrays)
    shards = TokenShards(tmp_path, "train", dtype=dtype)
    assert [Path(p).name for p in paths] == ["train_0000.bin", "train_0001.bin", "train_0002.bin", "train_0003.bin"]
    assert len(shards) == 52
    assert np.array_equal(shards[0:52], expected)
    assert np.array_equal(shards[10:40], expected[10:40])
    assert np.array_equal(shards[-3:], expected[-3:])
    assert shards[20] == expected[20]
    assert shards[-1] == expected[-1]
    assert shards[60:70].size == 0
    assert shards[0:52].dtype == dtype


def test_shards_single_file_memmap(tmp_path):
    write_shards([np.arange(10)], tmp_path, "val", np.uint16)
    tokens = TokenShards(tmp_path, "val", dtype=np.uint16).tokens
    assert isinstance(tokens, np.memmap)
    assert np.array_equal(tokens, np.arange(10))
    with pytest.raises(ValueError):
        tokens[0] = 1  # read-only


def test_shards_dtype_from_meta(tmp_path):
    write_shards([np.arange(5)], tmp_path, "train", np.uint32)
    write_meta(tmp_path, {"dtype": "uint32"})
    assert TokenShards(tmp_path, "train").dtype == np.uint32


def test_write_shards_removes_stale(tmp_path):
    write_shards([np.arange(40)], tmp_path, "train", np.uint16, shard_tokens=10)
    write_shards([np.arange(5)], tmp_path, "train", np.uint16, shard_tokens=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_0000.bin"]


def test_write_shards_value_too_large(tmp_path):
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_shards([np.array([70000])], tmp_path, "train", np.uint16)
    assert list(tmp_path.iterdir()) == []


def test_no_shards(tmp_path):
    with pytest.raises(ValueError, match=rf"no val shards \(val_0000.bin, ...\) in {tmp_path}"):
        TokenShards(tmp_path, "val", dtype=np.uint16)


def test_read_meta_missing(tmp_path):
    with pytest.raises(ValueError, match=f"token shard folder {tmp_path / 'x'} does not exist"):
        read_meta(tmp_path / "x")
    with pytest.raises(ValueError, match=f"token shard folder {tmp_path} has no meta.json"):
        read_meta(tmp_path)


def test_read_meta_round_trip(tmp_path):
    write_meta(tmp_path, {"dtype": "uint16", "vocab_size": 300})
    meta = read_meta(tmp_path)
    assert meta["vocab_size"] == 300
    assert meta["data_dir"] == str(tmp_path)
    assert "data_dir" not in json.loads((tmp_path / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------
# Shard preparation


def test_choose_validation():
    n_bytes = np.array([100, 5000, 120, 90, 80, 110, 95, 105, 100, 100])
    chosen = choose_validation(n_bytes, 0.05, np.random.default_rng(3))
    assert len(chosen) >= 1
    assert n_bytes[chosen].sum() <= 0.05 * n_bytes.sum()
    assert 1 not in chosen  # the long document would overshoot the target
    assert np.array_equal(chosen, choose_validation(n_bytes, 0.05, np.random.default_rng(3)))


def test_choose_validation_keeps_training():
    chosen = choose_validation(np.array([10, 10]), 0.49, np.random.default_rng(0))
    assert len(chosen) == 1


def test_data_config_problems():
    cfg = DataConfig(sources=" , ", vocab_size=10, val_fraction=0.0, num_proc=0, max_documents=-1)
    problems = cfg.problems()
    assert len(problems) == 5
    assert DataConfig().problems() == []


def test_too_few_documents(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("Only one document.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="hold 1 non-empty document.*need at least 2"):
        prepare.load_splits(DataConfig(sources=str(path)))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not DATA_DIR:
        pytest.skip(f"{DATA_DIR_ENV} is not set; point it at the data kit")
    out = tmp_path_factory.mktemp("prepared")
    cfg = DataConfig(sources="tinystories", max_documents=80, vocab_size=300, val_fraction=0.05, num_proc=1)
    tokenizer = train_tokenizer(cfg, out / "tokenizer.json")
    meta = prepare_shards(cfg, tokenizer, out / "data")
    return cfg, tokenizer, meta, out


def test_prepare_meta(prepared):
    cfg, tokenizer, meta, out = prepared
    assert meta["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert meta["dtype"] == "uint16"
    assert meta["sources"] == ["tinystories"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 80
    assert meta["splits"]["val"]["documents"] >= 1
    assert read_meta(out / "data")["splits"] == meta["splits"]


def test_prepare_tokens_are_documents(prepared):
    cfg, tokenizer, meta, out = prepared
    originals = set(texts(load_documents("tinystories").select(range(80))))
    decoded = []
    for split in ("train", "val"):
        tokens = np.asarray(TokenShards(out / "data", split).tokens)
        assert len(tokens) == meta["splits"][split]["tokens"]
        assert tokens[0] == tokenizer.eot_id
        assert int((tokens == tokenizer.eot_id).sum()) == meta["splits"][split]["documents"]
        pieces = tokenizer.decode(tokens.tolist()).split("<|endoftext|>")[1:]
        assert sum(len(p.encode("utf-8")) for p in pieces) == meta["splits"][split]["bytes"]
        decoded += pieces
    assert sorted(decoded) == sorted(originals)


def test_prepare_reuses(prepared, monkeypatch):
    cfg, tokenizer, meta, out = prepared

    def fail(_cfg):
        raise AssertionError("prepare_shards reloaded the corpus instead of reusing the shards")

    monkeypatch.setattr(prepare, "load_splits", fail)
    again = prepare_shards(cfg, tokenizer, out / "data")
    assert again["splits"] == meta["splits"]


def test_check_shards_match(prepared):
    cfg, tokenizer, meta, out = prepared
    check_shards_match(read_meta(out / "data"), tokenizer)
    other = Tokenizer.train(["other words entirely, other words"] * 10, vocab_size=300)
    with pytest.raises(ValueError, match=rf"token shards in {out / 'data'} were made with tokenizer .* Delete"):
        check_shards_match(read_meta(out / "data"), other)


# ---------------------------------------------------------------------------------------------
# The run folder's tokenizer


def write_corpus(path: Path, animal: str) -> Path:
    stories = [f"Story {i}: the {animal} went to the market and came back with bread and {i} apples." for i in range(30)]
    path.write_text("\n\n".join(stories) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def corpora(tmp_path) -> tuple[Path, Path]:
    return write_corpus(tmp_path / "cats.txt", "cat"), write_corpus(tmp_path / "dogs.txt", "dog")


def corpus_config(source: Path, **overrides) -> DataConfig:
    settings = {"vocab_size": 300, "val_fraction": 0.1, "num_proc": 1, **overrides}
    return DataConfig(sources=str(source), **settings)


def test_tokenizer_meta_written(corpora, tmp_path):
    prepare.prepare_run(corpus_config(corpora[0]), tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "tokenizer_meta.json").read_text())
    assert recorded == {"sources": [str(corpora[0])], "text_field": "text", "max_documents": 0, "vocab_size": 300}


def test_tokenizer_reused_with_same_data(corpora, tmp_path, monkeypatch):
    first, _, _ = prepare.prepare_run(corpus_config(corpora[0]), tmp_path / "run")

    def fail(*args):
        raise AssertionError("prepare_run trained a new tokenizer instead of reusing the run's")

    monkeypatch.setattr(prepare, "train_tokenizer", fail)
    # Another seed changes the validation split, not the corpus, so the tokenizer stays.
    again, _, _ = prepare.prepare_run(corpus_config(corpora[0], seed=7), tmp_path / "run")
    assert again.fingerprint == first.fingerprint


def test_tokenizer_other_sources_rejected(corpora, tmp_path):
    prepare.prepare_run(corpus_config(corpora[0]), tmp_path / "run")
    with pytest.raises(ValueError) as info:
        prepare.prepare_run(corpus_config(corpora[1]), tmp_path / "run")
    message = str(info.value)
    assert f"{tmp_path / 'run' / 'tokenizer.json'} was trained on other data than this run requests" in message
    assert f"({tmp_path / 'run' / 'tokenizer_meta.json'}: " in message
    assert f"data.sources was {[str(corpora[0])]!r}, this run requests {[str(corpora[1])]!r}" in message
    assert "Use another out_dir for this data, or delete" in message


def test_tokenizer_larger_vocab_rejected(corpora, tmp_path):
    prepare.prepare_run(corpus_config(corpora[0]), tmp_path / "run")
    with pytest.raises(ValueError, match=r"data\.vocab_size was 300, this run requests 400"):
        prepare.prepare_run(corpus_config(corpora[0], vocab_size=400), tmp_path / "run")


def test_tokenizer_retrained_after_delete(corpora, tmp_path):
    run = tmp_path / "run"
    first, _, _ = prepare.prepare_run(corpus_config(corpora[0]), run)
    (run / "tokenizer.json").unlink()
    second, _, _ = prepare.prepare_run(corpus_config(corpora[1]), run)
    assert second.fingerprint != first.fingerprint
    assert json.loads((run / "tokenizer_meta.json").read_text())["sources"] == [str(corpora[1])]


def test_tokenizer_without_meta_reused(corpora, tmp_path, caplog):
    run = tmp_path / "run"
    first, _, _ = prepare.prepare_run(corpus_config(corpora[0]), run)
    (run / "tokenizer_meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="pretrain.prepare"):
        again, _, _ = prepare.prepare_run(corpus_config(corpora[1]), run)
    assert again.fingerprint == first.fingerprint
    assert "has no tokenizer_meta.json beside it" in caplog.text


def test_prepare_command_rejects_other_data(corpora, tmp_path, capsys):
    settings = ["data.vocab_size=300", "data.val_fraction=0.1", "data.num_proc=1"]
    assert main(["prepare", f"out_dir={tmp_path / 'run'}", f"data.sources={corpora[0]}", *settings]) == 0
    assert main(["prepare", f"out_dir={tmp_path / 'run'}", f"data.sources={corpora[1]}", *settings]) == 2
    assert "tokenizer.json was trained on other data than this run requests" in capsys.readouterr().err


def test_empty_jsonl_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=rf"{path} is empty: it has no records"):
        list(load_documents(str(path)))


def test_misspelled_catalog_name_gets_a_suggestion(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="Did you mean 'tinystories'?"):
        list(load_documents("tinystoris"))
