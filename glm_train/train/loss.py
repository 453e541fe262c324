"""The blank-infilling loss: FP32 cross-entropy over Part-B targets only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, S] in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def glm_loss(logits: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the tokens where ``loss_mask`` is 1 (Part B)."""
    targets, loss_mask = labels
    losses = masked_token_losses(logits, targets)
    mask = loss_mask.float()
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
