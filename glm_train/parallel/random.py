"""TP-aware random state for dropout (CPU and GPU).

Replicated regions (hidden states after a row-parallel layer) must drop the same elements on every
TP rank, or the ranks' copies diverge; sharded regions (attention heads) must drop different ones.
The default torch generator is seeded identically across a TP group and serves replicated regions.
``TPRandom.fork()`` runs a sharded region on a stream derived from one draw of the default stream
and the TP rank. Deriving it (rather than keeping a second running stream) means that whatever
restores the default stream also restores the sharded masks: activation recomputation replays the
same dropout, and a checkpoint needs only the default stream. With one TP rank nothing is sharded,
so the body runs on the default stream itself: no fork, whose host-side seed draw would also split a
torch.compile graph in five places per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_OFFSET = 2718  # any constant: keeps the sharded streams apart from the default one


class TPRandom:
    """Seeds the default stream for this rank and forks sharded-region streams from it."""

    def __init__(self) -> None:
        self.tp_rank: int | None = None
        self.tp_size: int | None = None

    def seed(self, seed: int, pp_rank: int, tp_rank: int, tp_size: int | None = None) -> None:
        """Default stream: seed + 100*pp_rank, the same on every TP rank of a stage. ``tp_size`` 1
        makes :meth:`fork` a no-op (None: unknown, fork)."""
        torch.manual_seed(seed + 100 * pp_rank)
        self.tp_rank = tp_rank
        self.tp_size = tp_size

    @contextmanager
    def fork(self) -> Iterator[None]:
        """Run the body on a per-TP-rank stream; the default stream advances by exactly one draw."""
        if self.tp_rank is None or self.tp_size == 1:  # never seeded, or nothing sharded
            yield
            return
        draw = int(torch.randint(0, 2**62, (1,)))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((draw + _OFFSET + self.tp_rank) % 2**63)
            yield


TP_RANDOM = TPRandom()
"""The process-wide instance used by the model's sharded dropouts."""
