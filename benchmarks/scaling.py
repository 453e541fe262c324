"""Step time against sequence length, layers and batch: does the cost grow as the FLOP count says?

    python benchmarks/scaling.py [--json FILE] [--steps 3]

A small GLM (d=256, 4 heads, vocabulary 4096, fp32) through glm_train's engine on synthetic GLM
batches. For each sweep the table gives the median step time, the model FLOPs per step
(glm_train/train/flops.py, attention's s^2 term included) and the achieved FLOP/s; constant FLOP/s
along a sweep means the cost grows as predicted. Each point builds its own engine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import build_ours, finish, synthetic_batch  # noqa: E402

HIDDEN, HEADS, VOCAB = 256, 4, 4096
SWEEPS = {
    "sequence": [dict(layers=2, seq=s, micro=1) for s in (512, 1024, 2048, 4096)],
    "layers": [dict(layers=n, seq=512, micro=2) for n in (2, 4, 8)],
    "batch": [dict(layers=2, seq=512, micro=b) for b in (1, 2, 4, 8)],
}


def measure(layers: int, seq: int, micro: int, steps: int) -> dict[str, float]:
    from glm_train.config import ModelConfig
    from glm_train.train.flops import model_flops_per_token

    _, engine = build_ours("fp32", layers=layers, hidden=HIDDEN, heads=HEADS, seq=seq, vocab=VOCAB, micro=micro)
    batches = [synthetic_batch(i, micro, seq, VOCAB) for i in range(steps + 1)]
    times = []
    for i, (ids, pos, prefix, targets, mask) in enumerate(batches):
        t = time.perf_counter()
        engine.train_batch(iter([((ids, pos, prefix), (targets, mask))]))
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    scored = float(sum(b[4].sum() for b in batches)) / (len(batches) * micro * seq)
    m = ModelConfig(layers=layers, hidden=HIDDEN, heads=HEADS, seq_length=seq, vocab_size=VOCAB)
    flops = micro * seq * model_flops_per_token(m, seq, scored)
    step = statistics.median(times)
    return {"layers": layers, "seq": seq, "micro": micro, "step_s": step, "gflop_per_step": flops / 1e9,
            "gflops_per_s": flops / step / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    out: dict[str, list[dict[str, float]]] = {}
    for name, points in SWEEPS.items():
        out[name] = [measure(steps=args.steps, **pt) for pt in points]
    print(f"\nGLM d={HIDDEN}, {HEADS} heads, V={VOCAB}, fp32, through glm_train's engine")
    print(f"{'sweep':<10}{'layers':>7}{'seq':>6}{'batch':>6}{'step s':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'vs first':>9}")
    for name, rows in out.items():
        base = rows[0]["gflops_per_s"]
        for r in rows:
            print(f"{name:<10}{r['layers']:>7}{r['seq']:>6}{r['micro']:>6}{r['step_s']:>9.3f}"
                  f"{r['gflop_per_step']:>9.1f}{r['gflops_per_s']:>9.1f}{r['gflops_per_s'] / base:>9.2f}")
    finish(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
