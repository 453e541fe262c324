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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, sign: float) -> None:
    """``out = x cos + sign * rotate_half(x) sin`` on [..., 2, D/2] layouts, written into ``out``."""
    x1, x2, o1, o2 = x[..., 0, :], x[..., 1, :], out[..., 0, :], out[..., 1, :]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S, D] tables to [B, S, 1, blocks, D/(2 blocks)]: each rotated block's table repeats its first half."""
    d = cos.shape[-1]
    return tuple(t.unflatten(-1, (blocks, 2, d // (2 * blocks)))[..., 0, :].unsqueeze(2) for t in (cos, sin))


class _RotaryQKV(torch.autograd.Function):
    """Rotated q, k and v, each [B, H, S, D], from the fused projection output [B, S, 3, H, D].

    The same values as :func:`apply_rope_any` on q and k, in fewer passes: the rotation is two
    multiplies per half instead of negate, concatenate, two multiplies and an add, and backward is the
    inverse rotation written straight into the projection's gradient, so autograd neither stacks
    three gradients nor keeps the projection output alive for v (v is a copy, as q and k are).
    """

    @staticmethod
    def forward(ctx, qkv, cos, sin, blocks):  # type: ignore[override]
        b, s, _, heads, d = qkv.shape
        c, sn = _half_tables(cos, sin, blocks)
        x = qkv.unflatten(-1, (blocks, 2, d // (2 * blocks)))
        q = qkv.new_empty(b, s, heads, d)
        k = qkv.new_empty(b, s, heads, d)
        _rotate(x[:, :, 0], c, sn, q.unflatten(-1, (blocks, 2, -1)), 1.0)
        _rotate(x[:, :, 1], c, sn, k.unflatten(-1, (blocks, 2, -1)), 1.0)
        v = qkv[:, :, 2].contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.blocks = blocks
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    @staticmethod
    def backward(ctx, gq, gk, gv):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        blocks = ctx.blocks
        c, sn = _half_tables(cos, sin, blocks)
        ref = next(g for g in (gq, gk, gv) if g is not None)
        b, heads, s, d = ref.shape
        grad = ref.new_empty(b, s, 3, heads, d)
        g = grad.unflatten(-1, (blocks, 2, d // (2 * blocks)))
        for i, gi in enumerate((gq, gk)):
            if gi is None:
                grad[:, :, i].zero_()
            else:  # the transposed rotation: by -angle
                _rotate(gi.transpose(1, 2).unflatten(-1, (blocks, 2, -1)), c, sn, g[:, :, i], -1.0)
        if gv is None:
            grad[:, :, 2].zero_()
        else:
            grad[:, :, 2].copy_(gv.transpose(1, 2))
        return grad, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               two_d: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) [B, H, S, D] from the QKV projection [B, S, 3, H, D]: q and k rotated by cos/sin [B, S, D]
    as :func:`apply_rope_any` does. Under torch.compile the plain formula, which Inductor fuses itself."""
    if torch.compiler.is_compiling():
        q, k, _ = qkv.permute(2, 0, 3, 1, 4)
        # v copied as in eager mode: a view into qkv would reach the attention kernel with a sequence
        # stride of 3 H D. In compiled blocks on an H200, cuDNN's attention ran 1.8x as long per step
        # with that v as with eager's (docs/performance.md).
        v = qkv[:, :, 2].contiguous().transpose(1, 2)
        return apply_rope_any(q, cos, sin, two_d), apply_rope_any(k, cos, sin, two_d), v
    return _RotaryQKV.apply(qkv, cos, sin, 2 if two_d else 1)
