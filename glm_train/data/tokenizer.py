"""SentencePiece-based bilingual tokenizer with GLM special tokens.

The seven GLM special tokens are *appended* after the SentencePiece vocabulary
(ids ``sp_vocab_size .. sp_vocab_size + 6``), whatever the SentencePiece model
contains, so any ``.model`` file (ours or a foreign one) can be wrapped.

Round trips (``decode(encode(x)) == x``) are exact for models trained with
:func:`train_sentencepiece`: identity normalization, no whitespace collapsing,
no dummy prefix, byte fallback, and ``"\\n"``/``"\\t"`` as single tokens.
Known limitations:

* Text containing the literal special-token strings (e.g. ``"[MASK]"``) is
  always tokenized to the special id; there is no escaping.
* The character ``"\\u2581"`` (SentencePiece's whitespace marker) decodes to a
  plain space.
* Foreign models usually normalize (NFKC, whitespace collapsing, dummy
  prefix), so their round trips are lossy; each run of text between special
  tokens is encoded separately, so a dummy prefix is added per run and removed
  again per run on decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<eod>", "<sop>", "<eop>", "<pad>")

# Default upper bound (bytes) for one training sentence; longer lines are cut
# into chunks of at most this size instead of being dropped by sentencepiece.
_MAX_TRAIN_SENTENCE_BYTES = 4096


class GLMTokenizer:
    """Wraps a SentencePiece model and appends the GLM special tokens."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {self.path}")
        self._load(self.path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self._sp_size = int(self._sp.get_piece_size())
        self._special_ids = {tok: self._sp_size + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special = {i: tok for tok, i in self._special_ids.items()}
        # Longest first so that no special string can shadow a longer one.
        alternatives = sorted(SPECIAL_TOKENS, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in alternatives))

    # The C++ processor is not picklable; ship the model bytes instead so the
    # tokenizer can cross process boundaries (e.g. DataLoader workers).
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"GLMTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def sp_vocab_size(self) -> int:
        """Number of pieces in the underlying SentencePiece model."""
        return self._sp_size

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the special tokens (not padded)."""
        return self._sp_size + len(SPECIAL_TOKENS)

    def padded_vocab_size(self, multiple: int = 128) -> int:
        """``vocab_size`` rounded up to a multiple (for embedding tables)."""
        if multiple <= 0:
            raise ValueError(f"multiple must be positive, got {multiple}")
        return -(-self.vocab_size // multiple) * multiple

    @property
    def special_ids(self) -> dict[str, int]:
        """Mapping special token string -> id."""
        return dict(self._special_ids)

    @property
    def mask_id(self) -> int:
        return self._special_ids["[MASK]"]

    @property
    def gmask_id(self) -> int:
        return self._special_ids["[gMASK]"]

    @property
    def smask_id(self) -> int:
        return self._special_ids["[sMASK]"]

    @property
    def eod_id(self) -> int:
        return self._special_ids["<eod>"]

    @property
    def sop_id(self) -> int:
        return self._special_ids["<sop>"]

    @property
    def eop_id(self) -> int:
        return self._special_ids["<eop>"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["<pad>"]

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The underlying SentencePiece processor."""
        return self._sp

    def _segments(self, text: str) -> Iterator[tuple[bool, str]]:
        """Yield ``(is_special, segment)`` pairs covering ``text``."""
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                yield False, text[pos : m.start()]
            yield True, m.group()
            pos = m.end()
        if pos < len(text):
            yield False, text[pos:]

    def encode(self, text: str) -> list[int]:
        """Encode text; literal special-token strings become their single id."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode several texts (plain runs go through sentencepiece in one call)."""
        plans: list[list[tuple[bool, str]]] = [list(self._segments(t)) for t in texts]
        plain = [seg for plan in plans for special, seg in plan if not special]
        # One batched call lets sentencepiece use its own thread pool.
        encoded = iter(self._sp.encode(plain) if plain else [])
        out: list[list[int]] = []
        for plan in plans:
            ids: list[int] = []
            for special, seg in plan:
                if special:
                    ids.append(self._special_ids[seg])
                else:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids; specials render as their strings, padding ids are skipped."""
        parts: list[str] = []
        run: list[int] = []
        vocab = self.vocab_size
        for raw in ids:
            i = int(raw)
            if i < 0:
                raise ValueError(f"negative token id {i}")
            if i >= vocab:
                # Rows of a padded embedding table that no text maps to.
                continue
            if i >= self._sp_size:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._id_to_special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._sp.decode(run))
        # Runs are decoded separately to mirror encode(), which encodes each
        # run between specials on its own (matters for dummy-prefix models).
        return "".join(parts)

    def id_to_token(self, i: int) -> str:
        """The piece string (or special token) for an id."""
        if i in self._id_to_special:
            return self._id_to_special[i]
        if not 0 <= i < self._sp_size:
            raise ValueError(f"token id {i} out of range [0, {self.vocab_size})")
        return str(self._sp.id_to_piece(i))

    def fingerprint(self) -> str:
        """sha256 of the model bytes and the special token list."""
        h = hashlib.sha256()
        h.update(self._proto)
        h.update(b"\0specials\0")
        h.update(json.dumps(list(SPECIAL_TOKENS)).encode("utf-8"))
        return h.hexdigest()


def _utf8_chunks(line: str, limit: int) -> Iterator[str]:
    """Split ``line`` into pieces of at most ``limit`` UTF-8 bytes (char boundaries)."""
    if len(line.encode("utf-8")) <= limit:
        yield line
        return
    start, size = 0, 0
    for k, ch in enumerate(line):
        n = len(ch.encode("utf-8"))
        if size + n > limit:
            yield line[start:k]
            start, size = k, 0
        size += n
    if start < len(line):
        yield line[start:]


def training_sentences(texts: Iterable[str], max_bytes: int = _MAX_TRAIN_SENTENCE_BYTES) -> list[str]:
    """Split documents into non-empty lines, chunking lines longer than ``max_bytes``."""
    if max_bytes < 4:
        raise ValueError("max_bytes must fit at least one UTF-8 character")
    out: list[str] = []
    for text in texts:
        for line in text.split("\n"):
            if line:
                out.extend(_utf8_chunks(line, max_bytes))
    return out


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int = 8000,
    *,
    character_coverage: float = 0.9995,
    max_sentence_bytes: int = _MAX_TRAIN_SENTENCE_BYTES,
    input_sentence_size: int = 0,
    seed: int = 1234,
    num_threads: int = 2,
    model_type: str = "bpe",
) -> Path:
    """Train a round-trip-exact SentencePiece model; returns ``<model_prefix>.model``.

    Documents are split into lines (``"\\n"`` itself is a user-defined symbol,
    so it need not appear in training sentences); lines longer than
    ``max_sentence_bytes`` are chunked, never dropped. ``input_sentence_size``
    > 0 samples that many sentences with the fixed ``seed``.
    """
    sentences = training_sentences(texts, max_sentence_bytes)
    if not sentences:
        raise ValueError("no non-empty training text given")
    longest = max(len(s.encode("utf-8")) for s in sentences)
    # sentencepiece silently skips sentences longer than max_sentence_length;
    # by construction none is, and we say so loudly if that ever changes.
    assert longest <= max_sentence_bytes, (longest, max_sentence_bytes)

    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        # Exact round trips: no normalization, keep every space, no dummy "▁".
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        user_defined_symbols=["\n", "\t"],
        # Our own <eod>/<sop> replace BOS/EOS; only <unk> is kept (id 0).
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        unk_id=0,
        max_sentence_length=max(longest, 16),
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=input_sentence_size > 0,
        num_threads=num_threads,
        minloglevel=2,
    )
    model_path = prefix.with_name(prefix.name + ".model")
    # Write atomically so an interrupted run never leaves a half model file.
    tmp = model_path.with_name(f"{model_path.name}.tmp.{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, model_path)

    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab_path = prefix.with_name(prefix.name + ".vocab")
    lines = [f"{sp.id_to_piece(i)!r}\t{sp.get_score(i):g}" for i in range(sp.get_piece_size())]
    vocab_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_path


def load_tokenizer(path: str | Path) -> GLMTokenizer:
    """Convenience constructor (mirrors ``GLMTokenizer(path)``)."""
    return GLMTokenizer(path)


__all__ = [
    "SPECIAL_TOKENS",
    "GLMTokenizer",
    "load_tokenizer",
    "train_sentencepiece",
    "training_sentences",
]
