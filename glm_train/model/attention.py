"""Multi-head self-attention with fused QKV, RoPE and the GLM prefix mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_train.config import AttentionImpl, ModelConfig, PositionEncoding
from glm_train.model.rope import apply_rope_any
from glm_train.parallel.layers import ColumnParallelLinear, RowParallelLinear, xavier_normal_init
from glm_train.parallel.random import TP_RANDOM
from glm_train.parallel.state import tp_world_size


class SelfAttention(nn.Module):
    """Fused [Q; K; V] projection (column-parallel, heads split over TP ranks), output projection
    (row-parallel). DeepNorm's beta scales the V and output initializations, not Q and K."""

    def __init__(self, cfg: ModelConfig, layer_number: int, beta: float, seed: int) -> None:
        super().__init__()
        d = cfg.hidden
        self.layer_number = layer_number
        self.heads = cfg.heads // tp_world_size()
        self.head_dim = d // cfg.heads
        self.impl = AttentionImpl(cfg.attention_impl)
        self.two_d = PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d
        self.attention_dropout = cfg.attention_dropout
        prefix = f"layers.{layer_number}.attention"
        self.qkv = ColumnParallelLinear(d, 3 * d, init=xavier_normal_init(1.0, 3, [1.0, 1.0, beta]),
                                        seed=seed, key=prefix + ".qkv", interleave=3)
        self.dense = RowParallelLinear(d, d, init=xavier_normal_init(beta), seed=seed, key=prefix + ".dense")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B,H,S,D]
        q = apply_rope_any(q, cos, sin, self.two_d)
        k = apply_rope_any(k, cos, sin, self.two_d)
        p = self.attention_dropout if self.training else 0.0
        # Heads are sharded over TP ranks: their dropout masks come from the per-rank stream.
        with TP_RANDOM.fork():
            if self.impl == AttentionImpl.sdpa:
                # SDPA kernels accumulate the softmax in FP32 whatever the input dtype, which is what
                # query-key layer scaling protects in the eager path.
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            else:
                ctx = self._eager(q, k, v, mask, p)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               p: float) -> torch.Tensor:
        # Query-key layer scaling (GLM-130B): shrink q by (layer+1) before the matmul so FP16 scores
        # cannot overflow, and undo it in FP32 before the softmax.
        coeff = float(self.layer_number + 1)
        scores = torch.matmul(q / (self.head_dim ** 0.5 * coeff), k.transpose(-1, -2)).float() * coeff
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        if p > 0:
            probs = F.dropout(probs, p=p)
        return torch.matmul(probs, v)
