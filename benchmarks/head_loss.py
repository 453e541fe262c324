"""The output head + loss, whole against fused in chunks (``train.head_chunk``): time and memory.

    python benchmarks/head_loss.py [--tokens 2048 --hidden 512 --vocab 8192] [--chunks 0,1024,4096,4096c]
                                   [--dtypes bf16,fp32] [--rounds 7] [--device cpu|cuda] [--json FILE]

``GLMHeadLoss`` exactly as training runs it (TP = 1): ``--tokens`` scored positions of a
[tokens, hidden] batch (all of them scored), the tied head over ``--vocab`` rows, FP32 cross-entropy,
forward + backward. A chunk size ending in ``c`` is the fused head as ``train.compile`` runs it
(each chunk's softmax and gradient in torch.compile'd kernels; bf16 only, FP32 keeps the eager
steps, so those rows are skipped). The variants run alternately, one call each per round, after one untimed call
each; medians over the rounds. Memory: bytes the forward keeps for backward (saved-tensor hooks), and
on a GPU the peak allocated over one call above what was allocated before it. The default shape is
the throughput benchmark's head (micro-batch 8 x 512 positions, half scored). Prints a table;
``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import alternate, peak_bytes, saved_bytes  # noqa: E402
from glm_train.model.embedding import GLMEmbedding  # noqa: E402
from glm_train.train.loss import GLMHeadLoss  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    chunks = args.chunks.split(",")
    return [row for name in args.dtypes.split(",")
            for row in _one_dtype(args, name, [c for c in chunks if name == "bf16" or not c.endswith("c")])]


def _set(fn: GLMHeadLoss, variant: str) -> None:
    """``variant``: a head_chunk value, with a ``c`` suffix for the compiled chunk kernels."""
    fn.compiled = variant.endswith("c")
    fn.head_chunk = int(variant.removesuffix("c"))


def _one_dtype(args: argparse.Namespace, name: str, chunks: list[str]) -> list[dict[str, Any]]:
    rows = []
    dtype = DTYPES[name]
    head = GLMEmbedding(args.vocab, args.hidden, std=0.02, seed=0).to(device=args.device, dtype=dtype)
    fn = GLMHeadLoss(head)
    hidden = torch.randn(1, args.tokens, args.hidden, dtype=dtype, device=args.device, requires_grad=True)
    targets = torch.randint(0, args.vocab, (1, args.tokens), device=args.device)
    mask = torch.ones(1, args.tokens, device=args.device)

    def clear() -> None:
        hidden.grad = head.weight.grad = None

    def step(chunk: str) -> None:
        _set(fn, chunk)
        fn(hidden, (targets, mask)).backward()

    def forward(chunk: str) -> None:
        _set(fn, chunk)
        fn(hidden, (targets, mask))

    times = alternate({c: (lambda c=c: step(c)) for c in chunks}, args.rounds, args.device, clear)
    whole = statistics.median(times[chunks[0]])
    for c in chunks:
        med = statistics.median(times[c])
        rows.append({"dtype": name, "head_chunk": c, "tokens": args.tokens, "hidden": args.hidden,
                     "vocab": args.vocab, "device": args.device, "median_s": med,
                     "times_s": times[c], "vs_first": med / whole,
                     "saved_for_backward_bytes": saved_bytes(lambda c=c: forward(c)),
                     "peak_bytes": peak_bytes(lambda c=c: step(c), args.device, clear)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="scored positions")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--chunks", default="0,1024,4096,4096c",
                   help="head_chunk values, 'c' appended for the compiled chunk kernels; the first is the baseline")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    rows = run(args)
    print(f"head + loss, {args.tokens} scored tokens x hidden {args.hidden} x vocabulary {args.vocab}, "
          f"{args.device}, forward + backward, medians of {args.rounds} alternating rounds")
    print(f"{'dtype':>5} {'head_chunk':>10} {'ms':>8} {'vs first':>8} {'kept for bwd MiB':>16} {'peak MiB':>9}")
    for r in rows:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['dtype']:>5} {r['head_chunk']:>10} {r['median_s'] * 1e3:>8.1f} {r['vs_first']:>8.3f} "
              f"{r['saved_for_backward_bytes'] / 2**20:>16.1f} {peak:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
