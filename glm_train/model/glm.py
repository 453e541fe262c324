"""The GLM language model as one plain nn.Module (no pipeline scheduling in here).

``glm_train/train/pipeline.py`` cuts the same blocks into DeepSpeed pipeline stages.
"""

from __future__ import annotations

import torch
from torch import nn

from glm_train.config import ModelConfig, PositionEncoding
from glm_train.model.attention import KVCache
from glm_train.model.embedding import GLMEmbedding
from glm_train.model.layer import GLMBlock
from glm_train.model.mask import attention_mask as build_attention_mask
from glm_train.model.rope import rope_tables


def default_position_ids(input_ids: torch.Tensor, two_d: bool) -> torch.Tensor:
    b, s = input_ids.shape
    pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    if two_d:
        return torch.stack([pos, torch.zeros_like(pos)], dim=1)
    return pos


class GLMModel(nn.Module):
    """Embedding -> N DeepNorm blocks -> final LayerNorm -> tied head (logits = h E^T)."""

    def __init__(self, cfg: ModelConfig, seed: int = 1234) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be resolved from the tokenizer before building the model")
        self.cfg = cfg
        self.two_d = PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d
        self.embedding = GLMEmbedding(cfg.vocab_size, cfg.hidden, std=cfg.init_std, seed=seed)
        self.layers = nn.ModuleList(GLMBlock(cfg, i, seed) for i in range(cfg.layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                prefix_lengths: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, S, V] (FP32 not implied: the caller upcasts for the loss).

        ``prefix_lengths`` [B]: Part-A length of each sample (bidirectional); None means causal.
        ``position_ids``: [B, S] (1D) or [B, 2, S] (2D); None means 0..S-1.

        Inference only (keyword arguments; training never passes them):
        ``attention_mask`` [B, 1, S, T] bool, True where a query may see a key, replaces the mask made
        from ``prefix_lengths`` (T = S, or the cache's slots including the S new ones);
        ``cache`` (a :class:`KVCache`) receives this call's keys/values and supplies the earlier ones;
        ``last_only`` returns the logits of the last position only, [B, 1, V].
        """
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(input_ids, self.two_d)
        if attention_mask is None:
            if cache is not None:
                raise ValueError("decoding with a KV cache needs an explicit attention_mask")
            if prefix_lengths is None:
                prefix_lengths = torch.zeros(b, dtype=torch.long, device=input_ids.device)
            attention_mask = build_attention_mask(prefix_lengths, s, self.cfg.attention_impl)
        h = self.embedding(input_ids)
        cos, sin = rope_tables(position_ids, self.cfg.hidden // self.cfg.heads, self.cfg.rope_base,
                               self.two_d, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, attention_mask, cache)
        if last_only:
            h = h[:, -1:]
        return self.embedding.logits(self.final_layernorm(h))
