"""What autograd keeps for backward, measured: the storages packed by saved-tensor hooks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
