"""Tests for gpt.tokenizer: lossless round trips, special tokens, save/load, fingerprint, streaming decode."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import tokenizers

from gpt.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer

ROUND_TRIP_TEXTS = {
    "empty": "",
    "spaces": "a  b   c    d",
    "only_spaces": "     ",
    "tabs": "\tindented\t\ttwice\t",
    "newlines": "one\ntwo\n\n\nthree\n",
    "crlf": "line one\r\nline two\r\n\r\n",
    "lone_cr": "a\rb\r",
    "space_before_punctuation": " , . ! ? ; : ' \" ( )",
    "leading_spaces": "   leading",
    "emoji_skin_tone": "thumbs 👍🏽 up 👋🏿",
    "emoji_zwj_family": "family: 👨‍👩‍👧‍👦 and 🏳️‍🌈",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "nfd_combining_accents": "cafe\u0301 na\u0308ive Cre\u0300me",
    "nfc_accents": "café naïve Crème",
    "mixed_scripts": "Ελληνικά русский עברית العربية",
    "control_characters": "nul\x00bell\x07esc\x1b",
    "special_token_text": "<|endoftext|><|user|>hi<|end|>",
}

STREAM_TEXTS = [
    "👍🏽👨‍👩‍👧‍👦",
    "日本語のテキスト",
    "Once upon a time 🐉 in 北京, a dragon said 'héllo'.",
    "e\u0301\u0301 combining",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    data_dir = os.environ.get("GPTLAB_DATA_DIR")
    if not data_dir:
        pytest.skip("GPTLAB_DATA_DIR is not set; point it at the data kit to train the test tokenizer on real text")
    path = Path(data_dir) / "pretrain" / "tinystories" / "tinystories_train_prefix.txt.gz"
    text = gzip.open(path, "rt", encoding="utf-8").read()
    return Tokenizer.train(text.split("\n\n")[:600], vocab_size=512)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_round_trip_batch(tokenizer, text):
    ids = tokenizer.encode_batch([text, "x"])[0]
    assert ids == tokenizer.encode(text)


def test_nfd_stays_nfd(tokenizer):
    nfd = "cafe\u0301"
    assert tokenizer.encode(nfd) != tokenizer.encode("caf\u00e9")


def test_no_prefix_space(tokenizer):
    assert tokenizer.decode(tokenizer.encode("word")) == "word"
    assert tokenizer.encode("word") != tokenizer.encode(" word")


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_text_is_ordinary(tokenizer, special):
    ids = tokenizer.encode(special)
    assert len(ids) > 1
    assert min(ids) >= len(SPECIAL_TOKENS)
    assert tokenizer.decode(ids) == special


def test_special_text_in_batch_is_ordinary(tokenizer):
    ids = tokenizer.encode_batch(["say <|assistant|> now", "<|endoftext|>"])
    assert all(i >= len(SPECIAL_TOKENS) for row in ids for i in row)


def test_special_ids(tokenizer):
    assert [tokenizer.special_id(name) for name in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert tokenizer.eot_id == 0
    assert tokenizer.pad_id == 1
    assert SPECIAL_TOKENS[0] == "<|endoftext|>"
    assert SPECIAL_TOKENS[5] == "<|end|>"


def test_special_id_unknown(tokenizer):
    with pytest.raises(ValueError, match=r"'<\|bos\|>' is not a special token"):
        tokenizer.special_id("<|bos|>")


def test_decode_renders_specials(tokenizer):
    ids = [tokenizer.eot_id, *tokenizer.encode("Hi"), tokenizer.special_id("<|end|>")]
    assert tokenizer.decode(ids) == "<|endoftext|>Hi<|end|>"


def test_no_bos_or_eos_added(tokenizer):
    assert tokenizer.encode("") == []
    assert tokenizer.eot_id not in tokenizer.encode("a sentence.")


def test_vocab_size(tokenizer):
    assert tokenizer.vocab_size == 512


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match=f"vocab_size=100 is too small.*{MIN_VOCAB_SIZE}"):
        Tokenizer.train(["some text"], vocab_size=100)


def test_unseen_bytes_encode(tokenizer):
    # All 256 bytes are in the vocabulary, so characters never seen in training still encode.
    text = "\u0fff\U0001f9ec"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_load_equal(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.from_file(path)
    text = "Once upon a time, <|user|> saw 🐉 and 日本."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.fingerprint == tokenizer.fingerprint


def test_save_leaves_no_temp_file(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    tokenizer.save(tmp_path / "tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json"]


def test_fingerprint_stable(tokenizer):
    assert tokenizer.fingerprint == tokenizer.fingerprint
    assert len(tokenizer.fingerprint) == 16


def test_fingerprint_differs(tokenizer):
    other = Tokenizer.train(["a completely different corpus of words, repeated"] * 20, vocab_size=300)
    assert other.fingerprint != tokenizer.fingerprint


def test_from_file_missing(tmp_path):
    path = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(ValueError, match=f"tokenizer file {path} not found"):
        Tokenizer.from_file(path)


def test_from_file_not_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("not json", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path} is not a tokenizer.json"):
        Tokenizer.from_file(path)


def test_from_file_json_not_tokenizer(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": "gpt"}), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path} is not a tokenizer.json readable"):
        Tokenizer.from_file(path)


def test_from_file_without_our_specials(tmp_path):
    plain = tokenizers.Tokenizer(tokenizers.models.BPE())
    plain.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train_from_iterator(["hello world"] * 10, tokenizers.trainers.BpeTrainer(vocab_size=300))
    path = tmp_path / "tokenizer.json"
    plain.save(str(path))
    with pytest.raises(ValueError, match=rf"{path} is not a gptlab tokenizer: special token '<\|endoftext\|>'"):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_never_splits_characters(tokenizer, text):
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in tokenizer.encode(text)]
    pieces.append(decoder.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_stream_holds_back_partial_bytes(tokenizer):
    # With a 512-token vocabulary an emoji is several byte tokens, so some pushes return "".
    ids = tokenizer.encode("🐉")
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert len(ids) > 1
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🐉"


def test_stream_with_specials(tokenizer):
    ids = [tokenizer.special_id("<|assistant|>"), *tokenizer.encode("北京"), tokenizer.special_id("<|end|>")]
    decoder = tokenizer.stream_decoder()
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == "<|assistant|>北京<|end|>"


def test_stream_flush_incomplete(tokenizer):
    first_byte_only = tokenizer.encode("🐉")[0]
    decoder = tokenizer.stream_decoder()
    assert decoder.push(first_byte_only) == ""
    assert decoder.flush() == "\ufffd"


def test_token_bytes_out_of_range(tokenizer):
    with pytest.raises(ValueError, match="token id 512 is outside the vocabulary"):
        tokenizer.token_bytes(512)


def test_train_from_generator():
    texts = (f"document number {i} about cats and dogs" for i in range(200))
    tok = Tokenizer.train(texts, vocab_size=300)
    assert tok.decode(tok.encode("cats and dogs")) == "cats and dogs"
