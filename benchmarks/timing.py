"""What the micro-benchmarks (head_loss.py, block_parts.py) and the memory tests share: variants timed
alternately, the bytes a forward keeps for backward, and a call's peak GPU memory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


@contextmanager
def saved_storages(exclude: frozenset[int] = frozenset()) -> Iterator[dict[int, int]]:
    """Within the block, record {storage address: bytes} of every tensor saved for backward, each
    storage once and whole (views such as q, k, v of one projection share theirs), except the
    addresses in ``exclude`` (e.g. the parameters')."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def saved_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the storages that ``forward`` saves for backward (:func:`saved_storages`)."""
    with saved_storages() as storages:
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
