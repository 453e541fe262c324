"""glm-bench peak: the dense matmul TFLOP/s of this device in a precision, for hardware.peak_tflops.

    glm-bench peak [--dtype bf16|fp16|fp32] [--size 8192] [--device auto|cpu|cuda] [--reps 10]

MFU is model FLOP/s over a peak; the datasheet's peak is rarely reachable, so glm_train reports MFU
against a measured one when asked: the best of ``reps`` timed n x n x n products after warm-ups
(CUDA events on GPUs).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def matmul_tflops(dtype_name: str = "bf16", n: int = 4096, device: str = "auto", reps: int = 10) -> float:
    """Best TFLOP/s of an n x n x n matmul in ``dtype_name`` on ``device``."""
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = getattr(torch, _DTYPES[dtype_name])
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="glm-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    peak = sub.add_parser("peak", help="matmul TFLOP/s in a precision")
    peak.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    peak.add_argument("--size", type=int, default=None, help="matrix size (default 8192 on GPU, 2048 on CPU)")
    peak.add_argument("--device", default="auto")
    peak.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    import torch

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    n = args.size or (8192 if dev == "cuda" else 2048)
    tf = matmul_tflops(args.dtype, n, dev, args.reps)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{name}: {args.dtype} {n}x{n}x{n} matmul: {tf:.3f} TFLOP/s  (use hardware.peak_tflops={tf:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
