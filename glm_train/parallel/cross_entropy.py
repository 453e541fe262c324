"""Cross-entropy over logits whose vocabulary is split across TP ranks, without gathering them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glm_train.parallel.state import tp_group, tp_rank, tp_world_size


def _tp_all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    if tp_world_size() > 1:
        dist.all_reduce(t, op=op, group=tp_group())


def _softmax_terms(logits: torch.Tensor, target: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, ...]:
    """Over the whole (TP-split) vocabulary, of this rank's FP32 logits [N, V/tp] and global target
    ids [N]: (exp of the max-shifted logits, the max, the sum of exps, the shifted target logit,
    the target's column here [N, 1], whether it lies on another rank). ``inplace`` reuses ``logits``."""
    per = logits.shape[-1]
    top = logits.max(dim=-1).values
    _tp_all_reduce(top, dist.ReduceOp.MAX)
    shifted = logits.sub_(top.unsqueeze(-1)) if inplace else logits - top.unsqueeze(-1)
    local = target - tp_rank() * per
    outside = (local < 0) | (local >= per)
    local = local.masked_fill(outside, 0).unsqueeze(-1)
    predicted = shifted.gather(-1, local).squeeze(-1).masked_fill(outside, 0.0)
    _tp_all_reduce(predicted)
    exp = shifted.exp_()  # shifted is a tensor of our own either way
    sum_exp = exp.sum(dim=-1)
    _tp_all_reduce(sum_exp)
    return exp, top, sum_exp, predicted, local, outside


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target):  # type: ignore[override]
        # logits [N, V/tp] (this rank's vocabulary slice), FP32; target [N] global ids.
        exp, _, sum_exp, predicted, local, outside = _softmax_terms(logits, target)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local.squeeze(-1), outside)
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


def _eager_chunk_terms(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, c: torch.Tensor,
                       z_loss: float, grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's ``sum_i c_i loss_i`` and, if ``grads``, its logits' gradient in ``h``'s dtype:
    ``c ((1 + 2 z lse) softmax - onehot(target))``; any TP size, FP32 math in place. The logits are
    made here so that their matmul output dies as soon as its FP32 copy exists."""
    probs, top, sum_exp, predicted, local, outside = _softmax_terms(F.linear(h, weight).float(), target,
                                                                    inplace=True)
    lse = sum_exp.log()  # of the shifted logits
    loss = lse - predicted
    if z_loss:
        full_lse = lse + top
        loss = loss + z_loss * full_lse.square()
    part = (c * loss).sum()
    if not grads:
        return part, None
    scale = c / sum_exp if not z_loss else c * (1 + 2 * z_loss * full_lse) / sum_exp
    probs.mul_(scale.unsqueeze(-1))
    probs.scatter_add_(-1, local, (-c).masked_fill(outside, 0.0).unsqueeze(-1))
    return part, probs.to(h.dtype)


def _chunk_terms(logits: torch.Tensor, target: torch.Tensor, c: torch.Tensor,
                 z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``_eager_chunk_terms`` at TP = 1 written for Inductor: no in-place steps, so the FP32 copy, the
    exponentials and the one-hot are never stored. Compiled, it reads the bf16 logits three times
    and writes the gradient once (about 8 bytes per logit against the eager steps' ~46)."""
    x = logits.float()
    top = x.amax(dim=-1, keepdim=True)
    e = (x - top).exp()
    sum_exp = e.sum(dim=-1, keepdim=True)
    lse = sum_exp.log()
    loss = (lse - (x.gather(-1, target.unsqueeze(-1)) - top)).squeeze(-1)
    cc = c.unsqueeze(-1)
    if z_loss:
        full_lse = lse + top
        loss = loss + z_loss * full_lse.square().squeeze(-1)
        scale = cc * (1 + 2 * z_loss * full_lse) / sum_exp
    else:
        scale = cc / sum_exp
    cols = torch.arange(x.shape[-1], device=x.device)
    g = e * scale - torch.where(cols == target.unsqueeze(-1), cc, 0.0)
    return (c * loss).sum(), g.to(logits.dtype)


def compiled_chunks_apply(compiled: bool, dtype: torch.dtype, tp_size: int) -> bool:
    """Whether the fused head runs its chunks through :func:`compiled_chunk_terms`: under
    train.compile, in bf16 (FP32 keeps the eager in-place steps: as fast on a CPU, one chunk-sized
    tensor instead of two) and at TP = 1 (the all-reduces sit between the eager steps)."""
    return compiled and dtype == torch.bfloat16 and tp_size == 1


@functools.cache
def compiled_chunk_terms() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``_chunk_terms`` through torch.compile, built on first use (the fused head under train.compile)."""
    return torch.compile(_chunk_terms, fullgraph=True)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """``sum_i c_i (CE_i + z lse_i^2)`` over logits ``h W^T`` made ``chunk`` rows at a time.

    Each chunk's logits live only while its loss and its gradients are computed, in the forward
    pass; backward scales the two saved gradients by the incoming scalar. So what the head holds
    at the backward peak is ``dh`` and ``dW`` instead of ~12 bytes per logit, and the forward's
    transient is one chunk's logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, target, coeff, z_loss, chunk, grads, compiled):  # type: ignore[override]
        # hidden [N, d] (through copy_to_tp: its gradient is all-reduced over TP by autograd),
        # weight [V/tp, d] this rank's vocabulary rows, target [N] global ids, coeff [N] FP32.
        ctx.weight_dtype = weight.dtype
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if grads else None
        # Summed over chunks in FP32: a bf16 running sum would round the total at every chunk.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        fused = grads and compiled_chunks_apply(compiled, hidden.dtype, tp_world_size())
        for lo in range(0, hidden.shape[0], chunk):
            h, t, c = hidden[lo:lo + chunk], target[lo:lo + chunk], coeff[lo:lo + chunk]
            if fused:
                part, g = compiled_chunk_terms()(F.linear(h, weight), t, c, z_loss)
            else:
                part, g = _eager_chunk_terms(h, weight, t, c, z_loss, grads)
            total += part
            if g is None:
                continue
            torch.mm(g, weight, out=grad_h[lo:lo + chunk])
            if g.dtype == torch.float32:
                grad_w.addmm_(g.t(), h)
            else:
                grad_w += torch.mm(g.t(), h)
            del g  # before the next chunk's logits: two chunks' worth at once otherwise
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad, (grad_w * grad).to(ctx.weight_dtype), None, None, None, None, None, None


def chunked_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               coeff: torch.Tensor, z_loss: float, chunk: int, compiled: bool = False) -> torch.Tensor:
    """``sum_i coeff_i (CE_i + z_loss lse_i^2)`` of the tied head's logits ``hidden weight^T``, FP32.

    hidden [N, d] is the scored positions' hidden states (already through ``copy_to_tp`` under TP),
    weight [V/tp, d] this rank's vocabulary rows, target [N] global token ids, coeff [N] FP32 per-token
    weights (the loss mask over the token count). Logits are made ``chunk`` rows at a time and the
    gradients in the forward pass, so no [N, V/tp] tensor outlives its chunk. Not for fp16: its
    gradients need the loss scale inside the head (the logits' gradient underflows without it).
    ``compiled``: each chunk's softmax and gradient in kernels fused by torch.compile where
    :func:`compiled_chunks_apply` says so (bf16 at TP = 1).
    """
    if hidden.dtype == torch.float16:
        raise ValueError("chunked_head_cross_entropy: fp16 needs the loss scale inside the head's gradient")
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedHeadCrossEntropy.apply(hidden, weight, target, coeff.float(), float(z_loss), max(1, chunk),
                                          grads, compiled)
