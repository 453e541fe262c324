"""Tensor-parallel process-group state shared by the parallel building blocks.

At TP=1 no group is set and every block computes exactly what its plain torch counterpart does.
The 3D-parallel setup calls :func:`set_tensor_parallel_group` once per process before the model is built.
"""

from __future__ import annotations

import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def set_tensor_parallel_group(group: dist.ProcessGroup | None) -> None:
    """Register the tensor-parallel group (None for TP=1)."""
    global _TP_GROUP
    _TP_GROUP = group


def tp_group() -> dist.ProcessGroup | None:
    return _TP_GROUP


def tp_world_size() -> int:
    if _TP_GROUP is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(_TP_GROUP)


def tp_rank() -> int:
    if _TP_GROUP is None or not dist.is_initialized():
        return 0
    return dist.get_rank(_TP_GROUP)
