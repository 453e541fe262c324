"""TP-aware random state for dropout (CPU and GPU).

Replicated regions (hidden states after a row-parallel layer) must drop the same elements on every
TP rank, or the ranks' copies diverge; sharded regions (attention heads) must drop different ones.
The default torch generator is seeded identically across a TP group and serves replicated regions;
``TPRandom.fork()`` swaps in a per-TP-rank state for sharded regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_OFFSET = 2718  # any constant: keeps the sharded stream apart from the default one


def _get() -> torch.Tensor:
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.get_rng_state()


def _set(state: torch.Tensor) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class TPRandom:
    """Holds the sharded-region RNG state of this rank."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def seed(self, seed: int, pp_rank: int, tp_rank: int) -> None:
        """Default stream: seed + 100*pp_rank (same on all TP ranks); sharded: + 2718 + tp_rank."""
        base = seed + 100 * pp_rank
        torch.manual_seed(base)
        orig = _get()
        torch.manual_seed(base + _OFFSET + tp_rank)
        self.state = _get()
        _set(orig)

    @contextmanager
    def fork(self) -> Iterator[None]:
        """Run the body on the sharded-region stream."""
        if self.state is None:  # never seeded (plain model use, tests): the default stream
            yield
            return
        orig = _get()
        _set(self.state)
        try:
            yield
        finally:
            self.state = _get()
            _set(orig)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state = sd["state"]


TP_RANDOM = TPRandom()
"""The process-wide instance used by the model's sharded dropouts."""
