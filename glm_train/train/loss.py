"""The blank-infilling loss: FP32 cross-entropy over Part-B targets only.

The output head runs inside the loss on the scored positions alone: on average fewer than half of
a GLM sequence's tokens are in Part B, and the vocabulary projection is the largest matmul of a
small model, so skipping Part A saves a large share of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_train.model.embedding import shrink_gradient
from glm_train.parallel.comm import copy_to_tp
from glm_train.parallel.cross_entropy import (
    chunked_head_cross_entropy,
    vocab_parallel_cross_entropy,
    vocab_parallel_logsumexp,
)


def masked_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, same shape as ``targets``, in FP32 whatever the logits' dtype."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return flat.view_as(targets)


class GLMHeadLoss(nn.Module):
    """Tied head + loss: ``logits = h E^T`` at positions with a non-zero loss mask, mean FP32 CE.

    Holds a reference to the (tied) embedding module; its weight gets the head's gradient.
    """

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the embedding's parameters belong to the pipeline.
        object.__setattr__(self, "_embedding", embedding)

    @staticmethod
    def _select(hidden: torch.Tensor, targets: torch.Tensor,
                loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(hidden states [N, d], targets [N], FP32 weights [N]) of the N scored positions."""
        sel = loss_mask.reshape(-1) != 0
        return (hidden.reshape(-1, hidden.shape[-1])[sel], targets.reshape(-1)[sel],
                loss_mask.reshape(-1)[sel].float())

    def scored(self, hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
               with_lse: bool = False) -> tuple[torch.Tensor, ...]:
        """(per-token losses, weights[, log-partition]) of the scored positions only."""
        h, targets, weights = self._select(hidden, targets, loss_mask)
        # Under TP each rank scores its vocabulary slice; the loss is reduced without a gather.
        logits = self._embedding.logits(h, gather=False)
        losses = vocab_parallel_cross_entropy(logits, targets)
        if with_lse:
            return losses, weights, vocab_parallel_logsumexp(logits)
        return losses, weights

    sum_only = False
    """Return the summed loss instead of the mean (evaluation adds sums over micro-batches)."""

    grad_multiplier = 1.0
    """Fault injection (debug.huge_grad_steps): scales the gradient, not the value, of the loss."""

    z_loss = 0.0
    """Weight of the z-loss, ``z * mean(logsumexp(logits)^2)`` over scored tokens (PaLM); 0 disables."""

    head_chunk = 0
    """Scored tokens per chunk of the fused head + loss (``chunked_head_cross_entropy``); 0: the head's
    logits all at once, kept with their FP32 softmax for the backward pass."""

    compiled = False
    """Whether the fused head computes each chunk's softmax and gradient in torch.compile'd kernels
    (bf16 at TP = 1; set from ``train.compile``)."""

    def forward(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, loss_mask = labels
        if self.head_chunk > 0:
            loss = self._chunked(hidden, targets, loss_mask)
        else:
            loss = self._whole(hidden, targets, loss_mask)
        if self.grad_multiplier != 1.0:
            loss = shrink_gradient(loss, self.grad_multiplier)
        return loss

    def _chunked(self, hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        h, targets, weights = self._select(hidden, targets, loss_mask)
        # Evaluation's sum has weights as they are and no z-loss, as the whole head's.
        coeff = weights if self.sum_only else weights / weights.sum().clamp(min=1.0)
        z_loss = 0.0 if self.sum_only else self.z_loss
        return chunked_head_cross_entropy(copy_to_tp(h), self._embedding.weight, targets, coeff, z_loss,
                                          self.head_chunk, self.compiled)

    def _whole(self, hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        if self.z_loss > 0 and not self.sum_only:
            losses, weights, lse = self.scored(hidden, targets, loss_mask, with_lse=True)
        else:
            losses, weights = self.scored(hidden, targets, loss_mask)
        if self.sum_only:
            return (losses * weights).sum()
        count = weights.sum().clamp(min=1.0)
        loss = (losses * weights).sum() / count
        if self.z_loss > 0:
            loss = loss + self.z_loss * (lse.square() * weights).sum() / count
        return loss
