"""Two parts of a GLM block, our form against the plain one it replaced: time and memory.

    python benchmarks/block_parts.py [--parts attention,geglu] [--batch 4 --seq 512 --hidden 512 --heads 8]
                                     [--dtype bf16] [--dropout 0.1] [--rounds 7] [--device cpu|cuda]
                                     [--json FILE]

- ``attention``: split attention (``model.attention_impl=split``, the GPU default) forward + backward,
  its own backward (``_SplitPrefixAttention``: Part-A gradients added in place) against autograd's
  composition of the same two SDPA calls (zero-padded full-length sums, as selective recomputation
  still runs it). Two batches: every sample with Part A half the sequence (one batched Part-A call,
  as the GPU benchmark's synthetic batches), and Part-A lengths drawn per sample (one call each, as
  GLM's real batches). Gradient in the output projection's layout.
- ``geglu``: the MLP under torch.compile, forward + backward: its two projections from the fused
  weight's row blocks (``geglu_halves``) against the fused [B*S, 2f] projection and the chunked
  formula (whose gradient Inductor concatenates; on CUDA a kernel that evaluates both halves'
  formulas at every element). The compile happens in the untimed first call.

Variants alternate, one call each per round, after one untimed call each; medians over the rounds.
Memory: bytes kept for backward (saved-tensor hooks; the compiled variants' are Inductor's choice
and not seen by hooks, so "-"), and on a GPU the peak allocated over one call above what was
allocated before. Prints a table; ``--json FILE`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import alternate, peak_bytes, saved_bytes  # noqa: E402
from glm_train.config import ModelConfig  # noqa: E402
from glm_train.model.attention import split_prefix_attention  # noqa: E402
from glm_train.model.mlp import GeGLU, geglu_plain  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _compare(args: argparse.Namespace, part: str, case: str, variants: dict[str, Callable[[], None]],
             saved: dict[str, int | None], clear: Callable[[], None]) -> list[dict[str, Any]]:
    """Time ``variants`` (forward + backward each, ``clear`` dropping the gradients before each)
    alternately; the first is the reference."""
    times = alternate(variants, args.rounds, args.device, clear)
    first = statistics.median(next(iter(times.values())))
    return [{"part": part, "case": case, "variant": name, "device": args.device, "dtype": args.dtype,
             "median_s": statistics.median(t), "times_s": t, "vs_first": statistics.median(t) / first,
             "saved_for_backward_bytes": saved[name],
             "peak_bytes": peak_bytes(variants[name], args.device, clear)}
            for name, t in times.items()]


def attention_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    b, s, h = args.batch, args.seq, args.heads
    d, dtype, dev = args.hidden // h, DTYPES[args.dtype], args.device
    g = torch.Generator().manual_seed(0)
    cases = {"one Part A (s/2)": torch.full((b,), s // 2),
             "Part A per sample": torch.randint(1, s, (b,), generator=g)}
    # q, k, v as the attention receives them: [B, H, S, D] views, the gradient in the [B, S, H, D]
    # layout of the output projection's input.
    q, k, v = (torch.randn(b, s, h, d, dtype=dtype, device=dev).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad = torch.randn(b, s, h, d, dtype=dtype, device=dev).transpose(1, 2)
    def clear() -> None:
        q.grad = k.grad = v.grad = None

    rows = []
    for case, lengths in cases.items():
        def forward(own: bool, lengths: torch.Tensor = lengths) -> torch.Tensor:
            return split_prefix_attention(q, k, v, lengths.to(dev), args.dropout, own_backward=own)

        def step(own: bool, forward: Callable[[bool], torch.Tensor] = forward) -> None:
            forward(own).backward(grad)

        variants = {"composition": lambda step=step: step(False), "own backward": lambda step=step: step(True)}
        saved = {"composition": saved_bytes(lambda f=forward: f(False)),
                 "own backward": saved_bytes(lambda f=forward: f(True))}
        rows += _compare(args, "attention", case, variants, saved, clear)
    return rows


def geglu_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype, dev = DTYPES[args.dtype], args.device
    cfg = ModelConfig(hidden=args.hidden, heads=args.heads, layers=2, seq_length=args.seq, vocab_size=64)
    mlp = GeGLU(cfg, 0, 0.5, seed=0).to(device=dev, dtype=dtype)
    x = torch.randn(args.batch, args.seq, args.hidden, dtype=dtype, device=dev, requires_grad=True)
    grad = torch.randn_like(x)

    def fused(t: torch.Tensor) -> torch.Tensor:
        return mlp.dense_out(geglu_plain(F.linear(t, mlp.dense_in.weight, mlp.dense_in.bias)))

    compiled = {"fused projection": torch.compile(fused), "halves": torch.compile(mlp.forward)}

    def clear() -> None:
        x.grad = None
        mlp.zero_grad(set_to_none=True)

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        fn(x).backward(grad)

    variants = {name: (lambda fn=fn: step(fn)) for name, fn in compiled.items()}
    return _compare(args, "geglu (compiled)", f"{args.batch * args.seq} tokens, f={cfg.ffn_size()}", variants,
                    dict.fromkeys(variants), clear)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="attention,geglu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--dropout", type=float, default=0.1, help="attention dropout (the presets' 0.1)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    builders = {"attention": attention_rows, "geglu": geglu_rows}
    rows = [r for part in args.parts.split(",") for r in builders[part](args)]
    print(f"block parts, batch {args.batch} x sequence {args.seq}, hidden {args.hidden}, {args.heads} heads, "
          f"{args.dtype}, {args.device}, forward + backward, medians of {args.rounds} alternating rounds")
    print(f"{'part':>16} {'case':>26} {'variant':>16} {'ms':>8} {'vs first':>8} {'kept MiB':>9} {'peak MiB':>9}")
    for r in rows:
        kept = "-" if r["saved_for_backward_bytes"] is None else f"{r['saved_for_backward_bytes'] / 2**20:.1f}"
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
        print(f"{r['part']:>16} {r['case']:>26} {r['variant']:>16} {r['median_s'] * 1e3:>8.2f} "
              f"{r['vs_first']:>8.3f} {kept:>9} {peak:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
