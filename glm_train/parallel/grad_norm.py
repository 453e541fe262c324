"""Global gradient norm and clipping that count every parameter exactly once in any tp x pp x dp layout.

DeepSpeed's own fp32 path without ZeRO miscounts under pipeline parallelism
(../shared/DEEPSPEED_CPU_NOTES.md); the trainer installs this one there. Counted once means:
TP-sharded parameters on every TP rank, TP-replicated ones (LayerNorms, row-parallel biases) on TP
rank 0 only, the tied embedding's pipeline copy (``ds_pipe_replicated``) not at all, and data-parallel
replicas not summed (their gradients are already averaged).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def global_grad_norm(params: Iterable[torch.nn.Parameter], tp_rank: int,
                     model_parallel_group: dist.ProcessGroup | None) -> float:
    """L2 norm of all gradients of the model (one data-parallel replica), FP32 accumulation."""
    sq = None
    for p in params:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):
            continue
        if tp_rank != 0 and not getattr(p, "tensor_model_parallel", False):
            continue
        s = p.grad.detach().float().pow(2).sum()
        sq = s if sq is None else sq + s
    if sq is None:  # a rank without gradients still joins the reduction, on the backend's device
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        sq = torch.zeros((), dtype=torch.float32, device="cuda" if nccl else "cpu")
    sq = sq.reshape(1)
    if model_parallel_group is not None and dist.get_world_size(model_parallel_group) > 1:
        dist.all_reduce(sq, group=model_parallel_group)
    return float(sq.sqrt())


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float, tp_rank: int,
                   model_parallel_group: dist.ProcessGroup | None) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, tp_rank, model_parallel_group)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm
