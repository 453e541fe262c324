"""GeGLU feed-forward: W2(gelu(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm_train.config import ModelConfig
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
