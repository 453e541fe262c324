"""Word embedding with Embedding Gradient Shrink, doubling as the tied output head."""

from __future__ import annotations

import torch

from glm_train.parallel.layers import VocabParallelEmbedding, normal_init


def shrink_gradient(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Embedding Gradient Shrink: the value is unchanged, the gradient reaching ``x`` is scaled by alpha."""
    if alpha == 1.0:
        return x
    return x * alpha + x.detach() * (1.0 - alpha)


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
