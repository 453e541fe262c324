"""What the micro-benchmarks (head_loss.py, block_parts.py) share: variants timed alternately, the
bytes a forward keeps for backward, and a call's peak GPU memory."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _nothing() -> None:
    pass


def alternate(variants: dict[str, Callable[[], object]], rounds: int, device: str,
              reset: Callable[[], None] = _nothing) -> dict[str, list[float]]:
    """Seconds of each call: one untimed call of each variant first (allocator warm-up, compiles), then
    ``rounds`` rounds of one call each, so background load hits all variants alike. ``reset`` runs
    before every call, untimed (e.g. dropping the previous call's gradients)."""
    for fn in variants.values():
        reset()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            reset()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def saved_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the storages that ``forward`` saves for backward (saved-tensor hooks), each once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def peak_bytes(fn: Callable[[], object], device: str, reset: Callable[[], None] = _nothing) -> int | None:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it (after ``reset``);
    None off CUDA."""
    if device != "cuda":
        return None
    reset()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
