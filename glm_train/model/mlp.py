"""GeGLU feed-forward: W2(gelu(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm_train.config import ModelConfig
from glm_train.parallel.comm import copy_to_tp
from glm_train.parallel.layers import ColumnParallelLinear, RowParallelLinear, xavier_normal_init


class GeGLU(nn.Module):
    """The fused [gate; up] projection is sharded block by block (``interleave=2``), so every TP rank
    holds matching gate and up slices and the product never needs communication."""

    def __init__(self, cfg: ModelConfig, layer_number: int, beta: float, seed: int,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        d, f = cfg.hidden, cfg.ffn_size()
        prefix = f"layers.{layer_number}.mlp"
        self.dense_in = ColumnParallelLinear(d, 2 * f, init=xavier_normal_init(beta, 2), seed=seed,
                                             key=prefix + ".dense_in", interleave=2)
        self.dense_out = RowParallelLinear(f, d, init=xavier_normal_init(beta), seed=seed,
                                           key=prefix + ".dense_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self.dense_in, "weight", None)  # none once quantized (infer/quant.py)
        if isinstance(w, nn.Parameter) and torch.compiler.is_compiling():
            return self.dense_out(geglu_halves(copy_to_tp(x), w, self.dense_in.bias, self.recompute))
        if isinstance(w, nn.Parameter) and _split_halves(x, w):
            return self.dense_out(_GeGLUHalves.apply(copy_to_tp(x), w, self.dense_in.bias, self.recompute))
        h = self.dense_in(x)
        if self.recompute and torch.is_grad_enabled():
            # Selective recomputation: keep the projection output, rebuild gelu(gate) in backward.
            return self.dense_out(checkpoint(geglu, h, use_reentrant=False))
        return self.dense_out(geglu(h))


def geglu_plain(h: torch.Tensor) -> torch.Tensor:
    """``gelu(gate) * up`` for ``h = [gate, up]`` on the last dim, in autograd's own ops."""
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate) * up


class _GeGLU(torch.autograd.Function):
    """:func:`geglu_plain` with a backward that writes both halves of ``h``'s gradient in place.

    Autograd's version computes the gate and up gradients as two tensors and then concatenates them
    into h's layout (the chunk's backward): one extra pass over 2 b*s*f elements and a buffer. Here
    both are written straight into one gradient buffer, with the same ops on the same operands, so
    the values are bitwise those of the plain formula. It saves what autograd saves (h, gelu(gate)).
    """

    @staticmethod
    def forward(ctx, h):  # type: ignore[override]
        gate, up = h.chunk(2, dim=-1)
        act = F.gelu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad = torch.empty_like(h)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, act, out=grad_up)
        torch.ops.aten.gelu_backward.grad_input(grad_out * up, gate, grad_input=grad_gate)
        return grad


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``gelu(gate) * up`` for ``h = [gate, up]``: the fused autograd function, or the plain formula
    under torch.compile (Inductor fuses it itself, and traces aten ops better than custom functions)."""
    if torch.compiler.is_compiling():
        return geglu_plain(h)
    return _GeGLU.apply(h)


def _gelu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate) * up


def geglu_halves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 recompute: bool = False) -> torch.Tensor:
    """``gelu(x W_gate^T + b_gate) * (x W_up^T + b_up)`` from the fused weight's two row blocks, in
    autograd's own ops: the MLP's form under torch.compile.

    With one fused [B*S, 2f] projection, Inductor's backward concatenates the gate and up gradients
    by a "pointwise cat" on CUDA: one kernel over all 2f columns that evaluates both halves' formulas
    (GELU's derivative, and GELU itself) under masks at every element, four times the transcendental
    work needed. On an H200 (glm-1b, micro-batch 24) that kernel took 2.0 ms a block, the forward's
    0.45. Two projections give two gradient tensors, which one fused kernel writes, and the weight's
    gradient is concatenated from two matmul outputs ([f, d], not [B*S, 2f]). ``recompute``: keep gate
    and up, rebuild gelu(gate) in backward (selective recomputation).
    """
    biases = bias.chunk(2) if bias is not None else (None, None)
    gate, up = (F.linear(x, w, b) for w, b in zip(weight.chunk(2), biases, strict=True))
    if recompute and torch.is_grad_enabled():
        return checkpoint(_gelu_product, gate, up, use_reentrant=False)
    return _gelu_product(gate, up)


def _split_halves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :class:`_GeGLUHalves` runs: on CPU, eager, without autocast (whose casts F.linear makes)."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu"))


class _GeGLUHalves(torch.autograd.Function):
    """``gelu(x W_gate^T + b_gate) * (x W_up^T + b_up)`` with gate and up computed as separate tensors.

    On CPU, element-wise kernels on a half of the fused [B*S, 2f] projection (a strided view) run at
    about half the speed they reach on a contiguous tensor (bf16, 8x512x1408, 2 cores: gelu 3.6 against
    1.6 ms, its backward 5.1 against 3.0 ms). Two matmuls on the two row blocks of the fused weight give
    contiguous gate and up at the same FLOPs; backward writes the weight's gradient block by block.
    Same parameters, same layout (TP shards stay ``interleave=2``), same saved memory: x, gate, up and,
    unless ``recompute`` (selective recomputation rebuilds it), gelu(gate).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recompute):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        biases = bias.chunk(2) if bias is not None else (None, None)
        gate, up = (torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
                    for w, b in zip(weight.chunk(2), biases, strict=True))
        act = F.gelu(gate)
        ctx.save_for_backward(x, weight, gate, up, None if recompute else act)
        return (act * up).view(*x.shape[:-1], gate.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, gate, up, act = ctx.saved_tensors
        w_gate, w_up = weight.chunk(2)
        x2, g = x.reshape(-1, x.shape[-1]), grad_out.reshape(gate.shape)
        if act is None:
            act = F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(g * up, gate)
        grad_up = g * act
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_gate, w_gate)
            # addmm with out=, not addmm_: the same kernel, and torch's FLOP counter sees it.
            grad_x = torch.addmm(grad_x, grad_up, w_up, out=grad_x).view_as(x)
        if ctx.needs_input_grad[1]:  # each row block written in place: no concatenation
            grad_w = torch.empty_like(weight)
            for block, grad in zip(grad_w.chunk(2), (grad_gate, grad_up), strict=True):
                torch.mm(grad.t(), x2, out=block)
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = weight.new_empty(weight.shape[0])
            for block, grad in zip(grad_b.chunk(2), (grad_gate, grad_up), strict=True):
                torch.sum(grad, 0, out=block)
        return grad_x, grad_w, grad_b, None
