"""GLM's prefix-bidirectional attention mask."""

from __future__ import annotations

import weakref

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


# The last tensor :func:`host_lengths` read, its version counter and its values.
_last_read: tuple[weakref.ref[torch.Tensor], int, tuple[int, ...]] | None = None


def host_lengths(prefix_lengths: torch.Tensor) -> tuple[int, ...]:
    """The Part-A lengths [B] as Python ints, for the kernels whose calls they decide (split, blocks).

    Reading a GPU tensor on the host waits for the device, and the device then idles until the host
    queues its next kernel. Every block of a pipeline stage gets the same lengths tensor, so the
    values read for it are kept for the next caller: one read per micro-batch, not one per block.
    The cache is keyed on the tensor's identity and its version counter, so a new or modified
    tensor is read again.
    """
    global _last_read
    last = _last_read
    if last is not None and last[0]() is prefix_lengths and last[1] == prefix_lengths._version:
        return last[2]
    values = tuple(prefix_lengths.tolist())
    _last_read = (weakref.ref(prefix_lengths), prefix_lengths._version, values)
    return values
