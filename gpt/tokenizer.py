"""Byte-level BPE tokenizer: training, saving, encoding, decoding and streaming decode.

The tokenizer wraps a Hugging Face `tokenizers.Tokenizer` and is stored as the
standard `tokenizer.json`. Text is mapped to UTF-8 bytes before BPE, so every
string encodes and decodes back to the same bytes: there is no normalizer and
no prefix space, and the 256 byte tokens are always in the vocabulary.

Six special tokens have fixed ids 0..5 (`SPECIAL_TOKENS`). They are produced
only by code (the data pipeline, the chat template): `encode` never parses them
out of text, so a user who types "<|assistant|>" gets ordinary text tokens.

Limits: no normalization (NFC and NFD forms of a string encode differently),
and `decode` of an id sequence that ends inside a multi-byte character shows
U+FFFD for the missing part. `StreamDecoder` holds such bytes back instead.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt.files import atomic_write_text

logger = logging.getLogger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # document boundary; also serves as BOS and EOS
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",  # end of a chat turn
)

N_BYTE_TOKENS = 256
MIN_VOCAB_SIZE = N_BYTE_TOKENS + len(SPECIAL_TOKENS)


def _byte_to_char() -> dict[int, str]:
    """Map each byte to the printable character that stands for it in byte-level BPE tokens.

    Bytes that are printable Latin-1 characters stand for themselves. The other 68 bytes
    (controls, space, DEL, NBSP, soft hyphen) take the code points 256, 257, ... in byte
    order. This is the GPT-2 convention that `tokenizers`' ByteLevel pre-tokenizer follows.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_CHAR_TO_BYTE = {char: byte for byte, char in _byte_to_char().items()}


class Tokenizer:
    """Byte-level BPE tokenizer with the special tokens of `SPECIAL_TOKENS` at ids 0..5.

    Build one with `Tokenizer.train` or `Tokenizer.from_file`.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self._check_special_tokens(tokenizer, source="the given tokenizers.Tokenizer")
        # Not stored in tokenizer.json (tokenizers 0.23), so it is set on every instance.
        tokenizer.encode_special_tokens = True
        self._tk = tokenizer
        self._token_bytes: list[bytes] | None = None

    @staticmethod
    def _check_special_tokens(tokenizer: tokenizers.Tokenizer, source: str) -> None:
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            found_id = tokenizer.token_to_id(token)
            if found_id != expected_id:
                raise ValueError(
                    f"{source} is not a gptlab tokenizer: special token {token!r} has id {found_id}, "
                    f"expected {expected_id}. Train one with Tokenizer.train (gptlab pretrain) "
                    "and load the tokenizer.json it saves."
                )

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE merges on `texts`.

        Args:
            texts: documents, read once; any iterable, so a corpus need not fit in memory.
            vocab_size: the total vocabulary: 256 byte tokens, 6 special tokens and the merges.
            min_frequency: a pair must occur at least this many times to be merged.

        Returns:
            The trained tokenizer. Its vocabulary is smaller than `vocab_size` when the
            texts run out of pairs that occur `min_frequency` times.

        Raises:
            ValueError: `vocab_size` cannot hold the byte and special tokens.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the byte tokens and special tokens alone need "
                f"{MIN_VOCAB_SIZE} ({N_BYTE_TOKENS} + {len(SPECIAL_TOKENS)}). Use vocab_size >= {MIN_VOCAB_SIZE}."
            )
        tk = tokenizers.Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            # Seed all 256 bytes so that any text, even bytes unseen in training, can be encoded.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        if tk.get_vocab_size() < vocab_size:
            logger.warning(
                "tokenizer vocabulary has %d tokens, fewer than the requested vocab_size=%d: the training "
                "texts ran out of pairs seen at least %d times", tk.get_vocab_size(), vocab_size, min_frequency,
            )
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer.json written by `save`.

        Raises:
            ValueError: the file is missing, is not a tokenizer.json, or lacks the special tokens.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"tokenizer file {path} not found. Pass the tokenizer.json of a run folder, "
                "or train one with Tokenizer.train (gptlab pretrain)."
            )
        try:
            text = path.read_text(encoding="utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a tokenizer.json (not valid UTF-8 JSON: {e}).") from e
        try:
            tk = tokenizers.Tokenizer.from_str(text)
        # The Rust binding raises a bare Exception for JSON that is not a tokenizer.
        except Exception as e:
            raise ValueError(f"{path} is not a tokenizer.json readable by `tokenizers`: {e}") from e
        cls._check_special_tokens(tk, source=str(path))
        return cls(tk)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically: to a temporary file in the same folder, then renamed."""
        atomic_write_text(path, self._tk.to_str(pretty=True))

    def encode(self, text: str) -> list[int]:
        """Encode text to token ids, adding no BOS or EOS. Special-token strings in `text` stay ordinary text."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on the Rust thread pool; the same ids as `encode` on each."""
        encodings = self._tk.encode_batch_fast(texts, add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, special tokens included as their text."""
        return self._tk.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def special_id(self, name: str) -> int:
        """Return the id of a special token given by its text, e.g. "<|user|>"."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"{name!r} is not a special token. The special tokens are: {', '.join(SPECIAL_TOKENS)}.")
        return SPECIAL_TOKENS.index(name)

    @property
    def eot_id(self) -> int:
        return SPECIAL_TOKENS.index("<|endoftext|>")

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index("<|pad|>")

    @property
    def fingerprint(self) -> str:
        """A 16-hex-digit hash of the vocabulary, merges, special tokens and pre-tokenizer.

        Two tokenizers with the same fingerprint give the same ids for every text, so token
        shards store it to detect a mismatched tokenizer.
        """
        state = json.loads(self._tk.to_str())
        content = {
            "vocab": state["model"]["vocab"],
            "merges": state["model"]["merges"],
            "added_tokens": [(t["id"], t["content"], t["special"]) for t in state["added_tokens"]],
            "normalizer": state["normalizer"],
            "pre_tokenizer": state["pre_tokenizer"],
        }
        blob = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    def token_bytes(self, token_id: int) -> bytes:
        """Return the raw bytes a token stands for; a special token gives its UTF-8 text."""
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (0..{len(self._token_bytes) - 1}); "
                "a model with a padded vocab_size can sample such ids: mask their logits."
            )
        return self._token_bytes[token_id]

    def _build_token_bytes(self) -> list[bytes]:
        table = []
        for token_id in range(self.vocab_size):
            token = self._tk.id_to_token(token_id)
            if token_id < len(SPECIAL_TOKENS):
                table.append(token.encode("utf-8"))
            else:
                table.append(bytes(_CHAR_TO_BYTE[char] for char in token))
        return table

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoder for generation: feed ids one by one, get back only completed text.

    Byte-level tokens can end in the middle of a multi-byte UTF-8 character (an emoji
    often spans several tokens), so bytes of an incomplete character are held back until
    the tokens that complete it arrive. Byte sequences that can never be valid UTF-8 come
    out as U+FFFD, as in `Tokenizer.decode`.

    Example:
        decoder = tokenizer.stream_decoder()
        for token_id in generated:
            print(decoder.push(token_id), end="")
        print(decoder.flush())
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Return what is held back at the end of the stream (U+FFFD for an incomplete character) and reset."""
        return self._utf8.decode(b"", final=True)
