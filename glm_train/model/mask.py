"""GLM's prefix-bidirectional attention mask."""

from __future__ import annotations

import torch

from glm_train.config import AttentionImpl


def prefix_lm_mask(prefix_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, S, S], True where query i may attend to key j.

    Part A (the first ``prefix_lengths[b]`` tokens, [MASK]/[gMASK] included) is fully visible to
    everyone; Part B is causal. So j is visible from i iff j < prefix or j <= i.
    """
    idx = torch.arange(seq_len, device=prefix_lengths.device)
    causal = idx.view(1, seq_len, 1) >= idx.view(1, 1, seq_len)  # [1, S, S]: j <= i
    prefix = idx.view(1, 1, seq_len) < prefix_lengths.view(-1, 1, 1)  # [B, 1, S]: j < prefix
    return (causal | prefix).unsqueeze(1)


def attention_mask(prefix_lengths: torch.Tensor, seq_len: int, impl: AttentionImpl) -> torch.Tensor:
    """What the attention kernel ``impl`` takes: the Part-A lengths [B] for ``split`` and ``blocks``
    (they need no [B, 1, S, S] mask), the boolean mask of :func:`prefix_lm_mask` otherwise; ``auto``
    is resolved by the device of ``prefix_lengths``."""
    if AttentionImpl(impl).resolve(prefix_lengths.device) in (AttentionImpl.split, AttentionImpl.blocks):
        return prefix_lengths
    return prefix_lm_mask(prefix_lengths, seq_len)
