"""One GLM block: DeepNorm Post-LN around attention and GeGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm_train.config import ModelConfig
from glm_train.model.attention import KVCache, SelfAttention
from glm_train.model.deepnorm import deepnorm_constants
from glm_train.model.mlp import GeGLU


class GLMBlock(nn.Module):
    """``y = LN1(x); x = a*y + Attn(y); z = LN2(x); x = a*z + FFN(z)`` (SPEC.md).

    The residual carries the *normalized* input scaled by alpha, as in GLM-130B's code.
    """

    def __init__(self, cfg: ModelConfig, layer_number: int, seed: int,
                 recompute: frozenset[str] = frozenset()) -> None:
        """``recompute``: parts rebuilt in backward instead of stored ("attention", "geglu")."""
        super().__init__()
        self.alpha, beta = deepnorm_constants(cfg.layers, cfg.deepnorm)
        self.layer_number = layer_number
        self.input_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attention = SelfAttention(cfg, layer_number, beta, seed, recompute="attention" in recompute)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = GeGLU(cfg, layer_number, beta, seed, recompute="geglu" in recompute)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        y = self.input_layernorm(x)
        a = F.dropout(self.attention(y, cos, sin, mask, cache), self.dropout, self.training)
        x = y * self.alpha + a
        z = self.post_attention_layernorm(x)
        m = F.dropout(self.mlp(z), self.dropout, self.training)
        return z * self.alpha + m
