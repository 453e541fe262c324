"""Rotary position embedding, "rotate half" layout, not learned (SPEC.md)."""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, dim: int, base: float = 10000.0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, S, dim] for integer positions [B, S]; computed in FP32 for exact angles."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
    angles = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, dim/2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by cos/sin [B, S, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def rope_tables(position_ids: torch.Tensor, head_dim: int, base: float, two_d: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, head_dim] for 1D positions [B, S], or GLM's 2D positions [B, 2, S].

    2D: the first half of the head dim rotates by the position in Part A, the second half by the
    position within the span (original GLM).
    """
    if not two_d:
        return rope_cos_sin(position_ids, head_dim, base, dtype)
    c1, s1 = rope_cos_sin(position_ids[:, 0], head_dim // 2, base, dtype)
    c2, s2 = rope_cos_sin(position_ids[:, 1], head_dim // 2, base, dtype)
    return torch.cat([c1, c2], dim=-1), torch.cat([s1, s2], dim=-1)


def apply_rope_any(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, two_d: bool) -> torch.Tensor:
    """Apply 1D RoPE to the whole head, or 2D RoPE to each half separately."""
    if not two_d:
        return apply_rope(x, cos, sin)
    h = x.shape[-1] // 2
    return torch.cat([apply_rope(x[..., :h], cos[..., :h], sin[..., :h]),
                      apply_rope(x[..., h:], cos[..., h:], sin[..., h:])], dim=-1)
