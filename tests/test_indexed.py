"""Indexed dataset format tests, plus the pure demo-corpus helpers (no downloads)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from data_tools.demo_corpus import (
    bible_chapter_docs,
    expected_doc_counts,
    load_bible_verses,
    load_sanguo_chapters,
    split_docs,
    unigram_entropy,
)
from glm_train.data.indexed import IndexedDataset, check_fingerprint, write_indexed_dataset


def _docs(vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = [5, 0, 17, 1, 300]
    return [rng.integers(0, vocab, size=n) for n in lengths]


@pytest.mark.parametrize(("vocab", "dtype"), [(1000, np.uint16), (100_000, np.uint32)])
def test_round_trip(tmp_path: Path, vocab: int, dtype: type) -> None:
    docs = _docs(vocab)
    docs[0] = docs[0].tolist()  # plain lists are accepted too
    docs[-1][-1] = vocab - 1
    prefix = tmp_path / "ds"
    write_indexed_dataset(prefix, docs, vocab, "fp123")

    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs)
    assert ds.tokens.dtype == dtype
    assert ds.meta["dtype"] == np.dtype(dtype).name
    assert ds.meta["vocab_size"] == vocab and ds.meta["tokenizer_fingerprint"] == "fp123"
    assert ds.n_tokens == sum(len(d) for d in docs) == ds.meta["n_tokens"]
    assert ds.doc_lengths.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], np.asarray(d, dtype=np.int64))
    np.testing.assert_array_equal(ds.tokens, np.concatenate([np.asarray(d) for d in docs]))
    np.testing.assert_array_equal(ds[-1], docs[-1])
    np.testing.assert_array_equal(ds.get(4, offset=10, length=5), docs[4][10:15])
    np.testing.assert_array_equal(ds.get(4, offset=295, length=100), docs[4][295:])
    assert ds.get(1).size == 0
    with pytest.raises(IndexError):
        ds[len(docs)]
    with pytest.raises(IndexError):
        ds.get(0, offset=6)


def test_views_are_zero_copy_and_read_only(tmp_path: Path) -> None:
    write_indexed_dataset(tmp_path / "ds", _docs(1000), 1000)
    ds = IndexedDataset(tmp_path / "ds")
    assert isinstance(ds.tokens, np.memmap)
    doc = ds[4]
    assert np.shares_memory(doc, ds.tokens)
    assert not doc.flags.writeable
    with pytest.raises(ValueError):
        doc[0] = 1


def test_out_of_range_ids_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(tmp_path / "ds", [[1, 2, 1000]], 1000)
    with pytest.raises(ValueError, match="outside"):
        write_indexed_dataset(tmp_path / "ds", [[-1]], 1000)
    assert list(tmp_path.iterdir()) == []


def test_empty_dataset(tmp_path: Path) -> None:
    write_indexed_dataset(tmp_path / "ds", [], 1000)
    ds = IndexedDataset(tmp_path / "ds")
    assert len(ds) == 0 and ds.n_tokens == 0 and ds.tokens.size == 0


def test_truncated_bin_is_a_clear_error(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    write_indexed_dataset(prefix, _docs(1000), 1000)
    bin_path = tmp_path / "ds.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"ds\.bin.*truncated"):
        IndexedDataset(prefix)


def test_missing_file_and_bad_version(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    with pytest.raises(FileNotFoundError, match=r"ds\.json"):
        IndexedDataset(prefix)
    write_indexed_dataset(prefix, _docs(1000), 1000)
    meta_path = tmp_path / "ds.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99"):
        IndexedDataset(prefix)
    meta["version"] = 1
    meta["n_docs"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ds\.idx"):
        IndexedDataset(prefix)
    (tmp_path / "ds.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.idx"):
        IndexedDataset(prefix)


class _FakeTokenizer:
    def __init__(self, fp: str, vocab_size: int) -> None:
        self._fp, self.vocab_size = fp, vocab_size

    def fingerprint(self) -> str:
        return self._fp


def test_fingerprint_check(tmp_path: Path) -> None:
    write_indexed_dataset(tmp_path / "ds", _docs(1000), 1000, "aaaa")
    ds = IndexedDataset(tmp_path / "ds")
    check_fingerprint(ds, "aaaa")
    check_fingerprint(ds, _FakeTokenizer("aaaa", 1000))
    with pytest.raises(ValueError, match="re-tokenize"):
        check_fingerprint(ds, _FakeTokenizer("bbbb", 1000))
    with pytest.raises(ValueError, match="vocab_size"):
        check_fingerprint(ds, _FakeTokenizer("aaaa", 1001))
    write_indexed_dataset(tmp_path / "nofp", _docs(1000), 1000)
    with pytest.raises(ValueError, match="no tokenizer fingerprint"):
        check_fingerprint(IndexedDataset(tmp_path / "nofp"), "aaaa")


def test_failed_write_leaves_nothing_complete(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    # A complete older dataset at the same prefix must not survive as "complete".
    write_indexed_dataset(prefix, _docs(1000), 1000)

    def exploding() -> Iterator[list[int]]:
        yield [1, 2, 3]
        yield [4, 5]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_indexed_dataset(prefix, exploding(), 1000)
    assert not (tmp_path / "ds.json").exists()
    assert not any(".tmp." in p.name for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError):
        IndexedDataset(prefix)

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        write_indexed_dataset(fresh, exploding(), 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]


def test_demo_helpers(tmp_path: Path) -> None:
    verses = [
        {"citation": "A 1:1", "text": "a one.", "book": "A", "chapter": 1, "verse": 1},
        {"citation": "A 1:2", "text": "a two.", "book": "A", "chapter": 1, "verse": 2},
        {"citation": "A 2:1", "text": "b one.", "book": "A", "chapter": 2, "verse": 1},
        {"citation": "B 1:1", "text": "c one.", "book": "B", "chapter": 1, "verse": 1},
    ]
    jsonl = tmp_path / "kjv.jsonl"
    jsonl.write_text("".join(json.dumps(v) + "\n" for v in verses))
    assert bible_chapter_docs(load_bible_verses(jsonl, expected=4)) == ["a one.\na two.", "b one.", "c one."]
    with pytest.raises(ValueError, match="31103 verses"):
        load_bible_verses(jsonl)

    chapters = tmp_path / "sanguo.json"
    chapters.write_text(json.dumps(["\n 第一回\n\n\t正文 \n", "第二回"], ensure_ascii=False))
    assert load_sanguo_chapters(chapters, expected=2) == ["第一回\n\n\t正文", "第二回"]
    with pytest.raises(ValueError, match="120 chapters"):
        load_sanguo_chapters(chapters)

    train, val = split_docs([str(k) for k in range(100)], 50, 25)
    assert val == ["25", "75"] and len(train) == 98
    assert expected_doc_counts() == {"en_train": 1165, "en_val": 24, "zh_train": 117, "zh_val": 3}

    assert unigram_entropy(np.array([3, 3, 3], dtype=np.uint16)) == 0.0
    assert math.isclose(unigram_entropy(np.array([0, 1, 2, 7] * 5, dtype=np.uint16)), math.log(4))
    assert math.isclose(unigram_entropy(np.array([1, 1, 2, 2])), math.log(2))
    assert unigram_entropy(np.array([], dtype=np.uint16)) == 0.0
