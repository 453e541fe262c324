"""Word embedding with Embedding Gradient Shrink, doubling as the tied output head."""

from __future__ import annotations

import torch

from glm_train.parallel.layers import VocabParallelEmbedding, normal_init


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):  # type: ignore[override]
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.alpha, None


def shrink_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Embedding Gradient Shrink, GLM-130B's ``x*alpha + x.detach()*(1-alpha)``: the value passes
    unchanged and the gradient reaching ``x`` is scaled by alpha. Written as an autograd function so
    the forward pass is bitwise the identity rather than equal up to rounding."""
    if alpha == 1.0:
        return x
    return _ScaleGrad.apply(x, alpha)


class GLMEmbedding(VocabParallelEmbedding):
    """Token embedding; ``egs_alpha`` is set by the trainer each step from ``stability.egs``.

    Only the input lookup is shrunk: the tied head's gradient on the same weight is left whole,
    as in GLM-130B.
    """

    def __init__(self, vocab_size: int, hidden: int, *, std: float, seed: int) -> None:
        super().__init__(vocab_size, hidden, init=normal_init(std), seed=seed, key="embedding")
        self.egs_alpha = 1.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return shrink_gradient(super().forward(ids), self.egs_alpha)
