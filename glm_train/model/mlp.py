"""GeGLU feed-forward: W2(gelu(x W_gate) * (x W_up))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm_train.config import ModelConfig
from glm_train.parallel.layers import ColumnParallelLinear, RowParallelLinear, xavier_normal_init


class GeGLU(nn.Module):
    """The fused [gate; up] projection is sharded block by block (``interleave=2``), so every TP rank
    holds matching gate and up slices and the product never needs communication."""

    def __init__(self, cfg: ModelConfig, layer_number: int, beta: float, seed: int,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        d, f = cfg.hidden, cfg.ffn_size()
        prefix = f"layers.{layer_number}.mlp"
        self.dense_in = ColumnParallelLinear(d, 2 * f, init=xavier_normal_init(beta, 2), seed=seed,
                                             key=prefix + ".dense_in", interleave=2)
        self.dense_out = RowParallelLinear(f, d, init=xavier_normal_init(beta), seed=seed,
                                           key=prefix + ".dense_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense_in(x)
        if self.recompute and torch.is_grad_enabled():
            # Selective recomputation: keep the projection output, rebuild gelu(gate) in backward.
            return self.dense_out(checkpoint(_geglu, h, use_reentrant=False))
        return self.dense_out(_geglu(h))


def _geglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate) * up
