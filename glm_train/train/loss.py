"""The blank-infilling loss: FP32 cross-entropy over Part-B targets only.

The output head runs inside the loss on the scored positions alone: on average fewer than half of
a GLM sequence's tokens are in Part B, and the vocabulary projection is the largest matmul of a
small model, so skipping Part A saves a large share of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def scored(self, hidden: torch.Tensor, targets: torch.Tensor,
               loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token losses, weights) of the scored positions only."""
        sel = loss_mask.reshape(-1) != 0
        h = hidden.reshape(-1, hidden.shape[-1])[sel]
        logits = self._embedding.logits(h)
        return masked_token_losses(logits, targets.reshape(-1)[sel]), loss_mask.reshape(-1)[sel].float()

    def forward(self, hidden: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        targets, loss_mask = labels
        losses, weights = self.scored(hidden, targets, loss_mask)
        return (losses * weights).sum() / weights.sum().clamp(min=1.0)
