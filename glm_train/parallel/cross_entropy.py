"""Cross-entropy over logits whose vocabulary is split across TP ranks, without gathering them."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glm_train.parallel.state import tp_group, tp_rank, tp_world_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):  # type: ignore[override]
        # logits [N, V/tp] (this rank's vocabulary slice), FP32; target [N] global ids.
        group = tp_group()
        per = logits.shape[-1]
        start = tp_rank() * per
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - start
        outside = (local < 0) | (local >= per)
        local = local.masked_fill(outside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(predicted, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, outside)
        return sum_exp.log() - predicted

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        softmax, local, outside = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, local] -= (~outside).to(g.dtype)
        return g * grad.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss [N] in FP32 for this rank's logits slice [N, V/tp]; F.cross_entropy at TP=1."""
    logits = logits.float()
    if tp_world_size() == 1:
        return F.cross_entropy(logits, target, reduction="none")
    return _VocabParallelCrossEntropy.apply(logits, target)


class _VocabParallelLogSumExp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):  # type: ignore[override]
        group = tp_group()
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        exp = (logits - logits_max.unsqueeze(-1)).exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1))
        return sum_exp.log() + logits_max

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (softmax,) = ctx.saved_tensors
        return softmax * grad.unsqueeze(-1)


def vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logit_v) over the whole (TP-split) vocabulary, [N] in FP32; for the z-loss."""
    logits = logits.float()
    if tp_world_size() == 1:
        return torch.logsumexp(logits, dim=-1)
    return _VocabParallelLogSumExp.apply(logits)
