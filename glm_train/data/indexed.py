"""Memory-mapped token dataset: ``prefix.bin`` + ``prefix.idx`` + ``prefix.json``.

* ``prefix.bin``: all documents' tokens concatenated, native little-endian
  ``uint16`` when ``vocab_size <= 65535`` else ``uint32``. No separators are
  written; whoever builds samples adds ``<eod>`` etc.
* ``prefix.idx``: ``.npy`` array of ``int64`` document offsets (in tokens),
  length ``n_docs + 1``; document ``i`` is ``bin[idx[i]:idx[i+1]]``.
* ``prefix.json``: metadata (format version, dtype, counts, vocab size,
  tokenizer fingerprint). It is written last, so its presence marks a
  complete dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)


def _paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), Path(p + ".json")


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below ``vocab_size``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_indexed_dataset(
    prefix: str | Path,
    docs: Iterable[Sequence[int] | np.ndarray],
    vocab_size: int,
    tokenizer_fingerprint: str = "",
) -> None:
    """Stream documents into ``prefix.{bin,idx,json}``, atomically per file."""
    dtype = dtype_for_vocab(vocab_size)
    bin_path, idx_path, json_path = _paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    # Drop an old marker first: an old .json next to new .bin/.idx would
    # otherwise look complete while they are being replaced.
    json_path.unlink(missing_ok=True)

    tag = f".tmp.{os.getpid()}"
    tmp_bin, tmp_idx, tmp_json = (Path(str(p) + tag) for p in (bin_path, idx_path, json_path))
    offsets = [0]
    try:
        with open(tmp_bin, "wb") as f:
            for n, doc in enumerate(docs):
                arr = np.asarray(doc)
                if arr.ndim != 1:
                    raise ValueError(f"document {n} must be 1-D, got shape {arr.shape}")
                if arr.size:
                    if not np.issubdtype(arr.dtype, np.integer):
                        raise ValueError(f"document {n} has non-integer dtype {arr.dtype}")
                    lo, hi = int(arr.min()), int(arr.max())
                    if lo < 0 or hi >= vocab_size:
                        raise ValueError(f"document {n} has token ids outside [0, {vocab_size}): {lo}..{hi}")
                f.write(arr.astype(dtype, copy=False).tobytes())
                offsets.append(offsets[-1] + int(arr.size))
        with open(tmp_idx, "wb") as f:
            np.save(f, np.asarray(offsets, dtype=np.int64))
        meta = {
            "format": "glm_train.indexed",
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "n_docs": len(offsets) - 1,
            "n_tokens": offsets[-1],
            "vocab_size": int(vocab_size),
            "tokenizer_fingerprint": tokenizer_fingerprint,
        }
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_json, json_path)
    finally:
        for t in (tmp_bin, tmp_idx, tmp_json):
            t.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only, zero-copy view of a dataset written by :func:`write_indexed_dataset`."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        bin_path, idx_path, json_path = _paths(prefix)
        for p in (json_path, idx_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"indexed dataset file missing: {p}")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable dataset metadata {json_path}: {e}") from e
        version = meta.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{json_path}: unknown indexed format version {version!r} (supported: {SUPPORTED_VERSIONS})"
            )
        self.meta: dict[str, Any] = meta
        dtype = np.dtype(meta["dtype"])
        n_docs, n_tokens = int(meta["n_docs"]), int(meta["n_tokens"])

        try:
            offsets = np.load(idx_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"corrupt index file {idx_path}: {e}") from e
        if offsets.dtype != np.int64 or offsets.shape != (n_docs + 1,):
            raise ValueError(
                f"{idx_path}: expected int64 offsets of length {n_docs + 1}, "
                f"got {offsets.dtype} {offsets.shape}"
            )
        if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
            raise ValueError(f"{idx_path}: offsets inconsistent with n_tokens={n_tokens} in {json_path}")

        expected = n_tokens * dtype.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{bin_path}: size {actual} bytes, expected {expected} "
                f"({n_tokens} tokens x {dtype.itemsize} bytes); file truncated or corrupt"
            )
        self._offsets = offsets
        # np.memmap cannot map an empty file.
        if n_tokens:
            self._tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(n_tokens,))
        else:
            self._tokens = np.empty(0, dtype=dtype)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        """Document ``i`` as a read-only view into the memmap."""
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``i`` (a view)."""
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document index out of range: {i} (n_docs={n})")
        start, end = int(self._offsets[i]), int(self._offsets[i + 1])
        if offset < 0 or offset > end - start:
            raise IndexError(f"offset {offset} outside document {i} of length {end - start}")
        start += offset
        if length is not None:
            if length < 0:
                raise ValueError(f"negative length {length}")
            end = min(end, start + length)
        return self._tokens[start:end]

    @property
    def offsets(self) -> np.ndarray:
        """``int64`` document offsets into :attr:`tokens` (length ``n_docs + 1``)."""
        return self._offsets

    @property
    def doc_lengths(self) -> np.ndarray:
        """Length of every document in tokens."""
        return np.diff(self._offsets)

    @property
    def n_tokens(self) -> int:
        """Total number of tokens over all documents."""
        return int(self._offsets[-1])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size the data was written with."""
        return int(self.meta["vocab_size"])

    @property
    def tokens(self) -> np.ndarray:
        """The whole flat token memmap (documents back to back)."""
        return self._tokens

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, n_docs={len(self)}, n_tokens={self.n_tokens})"


def indexed_dataset_exists(prefix: str | Path) -> bool:
    """True when all three files exist (the dataset may still be invalid)."""
    return all(p.is_file() for p in _paths(prefix))


def check_fingerprint(ds: IndexedDataset, tokenizer: Any) -> None:
    """Raise ``ValueError`` unless ``ds`` was made with ``tokenizer``.

    ``tokenizer`` is a :class:`~glm_train.data.tokenizer.GLMTokenizer` or a
    fingerprint string.
    """
    want = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint()
    have = ds.meta.get("tokenizer_fingerprint", "")
    if have != want:
        what = "has no tokenizer fingerprint" if not have else f"was made with tokenizer {have[:12]}…"
        raise ValueError(
            f"dataset {ds.prefix} {what}, but the current tokenizer is {want[:12]}…; "
            "re-tokenize the data with this tokenizer"
        )
    if not isinstance(tokenizer, str) and ds.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"dataset {ds.prefix} vocab_size {ds.vocab_size} != tokenizer vocab_size {tokenizer.vocab_size}"
        )


__all__ = [
    "FORMAT_VERSION",
    "IndexedDataset",
    "check_fingerprint",
    "dtype_for_vocab",
    "indexed_dataset_exists",
    "write_indexed_dataset",
]
