"""Autograd-aware tensor-parallel communication (Megatron's four conjugate operators).

Each is the identity at TP=1, so the model pays nothing for being parallel-ready.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from glm_train.parallel.state import tp_group, tp_rank, tp_world_size


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_world_size() == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=tp_group())
    return x


def _split_last(x: torch.Tensor) -> torch.Tensor:
    n = tp_world_size()
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[tp_rank()].contiguous()


def _gather_last(x: torch.Tensor) -> torch.Tensor:
    n = tp_world_size()
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=tp_group())
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    """Forward: identity. Backward: sum the input gradients of all TP ranks."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _all_reduce(g.clone())


class _ReduceFromTP(torch.autograd.Function):
    """Forward: sum partial results over TP ranks. Backward: identity."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return _all_reduce(x.clone())

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


class _GatherFromTP(torch.autograd.Function):
    """Forward: concatenate the last dim over TP ranks. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return _gather_last(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _split_last(g)


class _ScatterToTP(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: gather."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return _split_last(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _gather_last(g)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_world_size() == 1 else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_world_size() == 1 else _ReduceFromTP.apply(x)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_world_size() == 1 else _GatherFromTP.apply(x)


def scatter_to_tp(x: torch.Tensor) -> torch.Tensor:
    return x if tp_world_size() == 1 else _ScatterToTP.apply(x)
