"""Demo MIP tasks made from the demo corpora's TRAINING split (never the validation chapters).

Three prompted datasets, written as jsonl under ``<out_dir>/mip_src/`` and then tokenized into the
MIP dataset ``<out_dir>/mip`` (:func:`data_tools.mip.build_mip`, demo tokenizer):

* ``kjv_book``: "Which book of the Bible is this verse from? <verse>\\nAnswer:" -> " Genesis".
* ``kjv_cloze``: a verse with one word (3+ letters) replaced by "____" -> " <word>".
* ``sanguo_chapter``: a 100-200 character passage of a 三国演义 chapter body (title line removed,
  whitespace dropped, passages naming any "第N回" rejected) -> "第N回", numbered as the book's
  own titles do (第一百一回, 第一百十回).

Train/validation membership uses the rules of :mod:`data_tools.demo_corpus`: Bible chapter ``k``
(global order) is validation iff ``k % 50 == 25``, 三国演义 chapter ``k`` iff ``k % 40 == 20``.
The record generators are pure functions of the verses/chapters and a seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.demo_corpus import (
    EN_VAL_MOD,
    EN_VAL_REM,
    ZH_VAL_MOD,
    ZH_VAL_REM,
    fetch_sources,
    load_bible_verses,
    load_sanguo_chapters,
    write_records_jsonl,
)
from data_tools.mip import build_mip
from glm_train.data.mip import MIPDataset
from glm_train.data.tokenizer import GLMTokenizer

TASK_SIZES = {"kjv_book": 6000, "kjv_cloze": 6000, "sanguo_chapter": 4000}
DEMO_CAP = 5000
PASSAGE_CHARS = (100, 200)
_DIGITS = "零一二三四五六七八九"
_CHAPTER_RE = re.compile(r"第[零一二三四五六七八九十百]+回")
_WORD_RE = re.compile(r"^([^A-Za-z]*)([A-Za-z]{3,})([^A-Za-z]*)$")
_MANIFEST_VERSION = 1


def _log(msg: str) -> None:
    print(f"[demo_mip] {msg}", flush=True)


# ------------------------------------------------------------- pure record generators


def training_verses(
    verses: Sequence[dict[str, Any]], val_mod: int = EN_VAL_MOD, val_rem: int = EN_VAL_REM
) -> list[dict[str, Any]]:
    """Verses of training chapters only; chapters numbered in file order like ``bible_chapter_docs``."""
    chapter_index: dict[tuple[str, int], int] = {}
    out = []
    for v in verses:
        k = chapter_index.setdefault((v["book"], int(v["chapter"])), len(chapter_index))
        if k % val_mod != val_rem:
            out.append(v)
    return out


def training_chapters(
    chapters: Sequence[str], val_mod: int = ZH_VAL_MOD, val_rem: int = ZH_VAL_REM
) -> list[tuple[int, str]]:
    """``(chapter number, text)`` of training chapters (numbers 1-based, as in the book)."""
    return [(k + 1, c) for k, c in enumerate(chapters) if k % val_mod != val_rem]


def chinese_chapter_number(n: int) -> str:
    """Chapter numeral in the style of the book's titles: 十, 十一, 二十, 一百, 一百一, 一百十, 一百二十."""
    if not 1 <= n <= 999:
        raise ValueError(f"chapter number out of range: {n}")
    hundreds, tens, ones = n // 100, n // 10 % 10, n % 10
    out = _DIGITS[hundreds] + "百" if hundreds else ""
    if tens:
        out += ("" if tens == 1 else _DIGITS[tens]) + "十"
    if ones:
        out += _DIGITS[ones]
    return out


def _sample(rng: np.random.Generator, n_items: int, n: int) -> np.ndarray:
    """``n`` distinct indices when possible, else every index plus repeats."""
    if n <= n_items:
        return rng.choice(n_items, size=n, replace=False)
    return np.concatenate([rng.permutation(n_items), rng.choice(n_items, size=n - n_items)])


def kjv_book_records(verses: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, str]]:
    """Verse -> its book. ``verses`` must already be training verses."""
    if not verses:
        return []
    rng = np.random.default_rng([seed, 1])
    picks = [verses[int(i)] for i in _sample(rng, len(verses), n)]
    return [{"prompt": f"Which book of the Bible is this verse from? {v['text']}\nAnswer:",
             "target": f" {v['book']}"} for v in picks]


def kjv_cloze_records(verses: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, str]]:
    """Verse with one word blanked -> the word. Only words of 3+ letters (punctuation kept) are blanked."""
    rng = np.random.default_rng([seed, 2])
    candidates = []
    for v in verses:
        words = v["text"].split(" ")
        slots = [j for j, w in enumerate(words) if _WORD_RE.match(w)]
        if slots:
            candidates.append((words, slots))
    records = []
    for i in _sample(rng, len(candidates), n) if candidates else []:
        words, slots = candidates[int(i)]
        j = slots[int(rng.integers(len(slots)))]
        m = _WORD_RE.match(words[j])
        assert m is not None
        masked = words[:j] + [m.group(1) + "____" + m.group(3)] + words[j + 1 :]
        records.append({"prompt": f"Fill in the blank: {' '.join(masked)}\nAnswer:", "target": f" {m.group(2)}"})
    return records


def chapter_body(text: str, number: int) -> str:
    """Chapter text without its title line and without whitespace; checks the title's number."""
    first, _, rest = text.partition("\n")
    m = _CHAPTER_RE.match(first.strip())
    if m:
        want = f"第{chinese_chapter_number(number)}回"
        if m.group() != want:
            raise ValueError(f"chapter {number}: title says {m.group()}, expected {want} (misaligned chapters?)")
        text = rest
    # Paragraph breaks are "\n\n\t" and full-width spaces: meaningless inside a short passage.
    return re.sub(r"\s+", "", text)


def sanguo_chapter_records(
    chapters: Sequence[tuple[int, str]], n: int, seed: int, chars: tuple[int, int] = PASSAGE_CHARS
) -> list[dict[str, str]]:
    """Passage of a chapter -> "第N回". ``chapters`` are ``(number, text)`` training chapters."""
    rng = np.random.default_rng([seed, 3])
    bodies = [(num, chapter_body(text, num)) for num, text in chapters]
    bodies = [(num, b) for num, b in bodies if len(b) >= chars[0]]
    records: list[dict[str, str]] = []
    attempts = 0
    while bodies and len(records) < n:
        attempts += 1
        if attempts > 20 * n:
            raise RuntimeError(f"could not draw {n} clean passages in {attempts} tries")
        num, body = bodies[int(rng.integers(len(bodies)))]
        length = int(rng.integers(chars[0], min(chars[1], len(body)) + 1))
        start = int(rng.integers(len(body) - length + 1))
        passage = body[start : start + length]
        if _CHAPTER_RE.search(passage):  # would name a chapter: the answer or a misleading one
            continue
        records.append({"prompt": f"下面这段文字出自《三国演义》第几回？\n{passage}\n答：",
                        "target": f"第{chinese_chapter_number(num)}回"})
    return records


def demo_records(
    verses: Sequence[dict[str, Any]], chapters: Sequence[str], seed: int = 1234,
    sizes: dict[str, int] | None = None,
) -> dict[str, list[dict[str, str]]]:
    """All three tasks from the full source lists (validation chapters are dropped here)."""
    sizes = {**TASK_SIZES, **(sizes or {})}
    train_v = training_verses(verses)
    train_c = training_chapters(chapters)
    return {
        "kjv_book": kjv_book_records(train_v, sizes["kjv_book"], seed),
        "kjv_cloze": kjv_cloze_records(train_v, sizes["kjv_cloze"], seed),
        "sanguo_chapter": sanguo_chapter_records(train_c, sizes["sanguo_chapter"], seed),
    }


# ------------------------------------------------------------------- pipeline


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sources_ok(src_dir: Path, seed: int) -> bool:
    try:
        manifest = json.loads((src_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("version") != _MANIFEST_VERSION or manifest.get("seed") != seed \
            or manifest.get("sizes") != TASK_SIZES:
        return False
    files = manifest.get("files", {})
    return set(files) == set(TASK_SIZES) and all(
        (src_dir / f"{name}.jsonl").is_file() and _sha256(src_dir / f"{name}.jsonl") == digest
        for name, digest in files.items()
    )


def _mip_ok(prefix: Path, src_dir: Path, tok: GLMTokenizer, seed: int) -> dict[str, Any] | None:
    try:
        ds = MIPDataset(prefix)
    except (FileNotFoundError, ValueError):
        return None
    meta = ds.meta
    want = {name: _sha256(src_dir / f"{name}.jsonl") for name in TASK_SIZES}
    have = {d["name"]: d.get("sha256") for d in meta.get("datasets", [])}
    if (meta.get("tokenizer_fingerprint") != tok.fingerprint()
            or ds.indexed.meta.get("tokenizer_fingerprint") != tok.fingerprint()
            or meta.get("seed") != seed or meta.get("cap") != DEMO_CAP or have != want):
        return None
    return meta


def build_demo_mip(out_dir: Path, cache_dir: Path, tokenizer_path: Path, seed: int = 1234) -> dict[str, Any]:
    """Write the demo task jsonl files and the MIP dataset ``out_dir/mip``; idempotent.

    Returns the MIP metadata plus ``skipped`` (True when valid outputs were already there) and
    ``seconds``.
    """
    t0 = time.perf_counter()
    out_dir, src_dir = Path(out_dir), Path(out_dir) / "mip_src"
    prefix = out_dir / "mip"
    tok = GLMTokenizer(tokenizer_path)
    if _sources_ok(src_dir, seed):
        meta = _mip_ok(prefix, src_dir, tok, seed)
        if meta is not None:
            _log(f"MIP dataset exists: {prefix}")
            return {**meta, "skipped": True, "seconds": round(time.perf_counter() - t0, 3)}
    else:
        src_dir.mkdir(parents=True, exist_ok=True)
        (src_dir / "manifest.json").unlink(missing_ok=True)
        bible, sanguo = fetch_sources(cache_dir)
        records = demo_records(load_bible_verses(bible), load_sanguo_chapters(sanguo), seed)
        for name, recs in records.items():
            write_records_jsonl(src_dir / f"{name}.jsonl", recs)
            _log(f"wrote {src_dir / name}.jsonl: {len(recs)} records")
        manifest = {"version": _MANIFEST_VERSION, "seed": seed, "sizes": TASK_SIZES,
                    "files": {name: _sha256(src_dir / f"{name}.jsonl") for name in TASK_SIZES}}
        # The manifest goes last: its presence marks a complete set of source files.
        tmp = src_dir / f"manifest.json.tmp.{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, src_dir / "manifest.json")
    meta = build_mip(src_dir, prefix, tok, cap=DEMO_CAP, seed=seed, log=_log)
    meta.pop("seconds", None)
    return {**meta, "skipped": False, "seconds": round(time.perf_counter() - t0, 3)}


def main(argv: list[str] | None = None) -> None:
    """``python -m data_tools.demo_mip``: build the demo MIP data next to the prepared demo corpus."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="data/demo", help="prepared demo folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    meta = build_demo_mip(out, out / "cache", out / "tokenizer.model", seed=args.seed)
    summary = {k: meta[k] for k in ("n_docs", "n_tokens", "skipped", "seconds")}
    summary["datasets"] = {d["name"]: {k: d[k] for k in ("valid", "kept", "prompt_tokens", "target_tokens")}
                           for d in meta["datasets"]}
    print(json.dumps(summary, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
