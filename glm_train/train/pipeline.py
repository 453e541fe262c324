"""The GLM model cut into DeepSpeed pipeline layers.

The stages reuse the model's own blocks; only the calling convention changes: every layer takes
and returns a tuple ``(hidden, position_ids, prefix_lengths)`` so that the integer side inputs
travel with the activations between stages. The embedding is a tied layer: the first stage uses it
for lookups; the last stage holds it too, and the loss (GLMHeadLoss) applies it as the output head
(logits = h E^T) on the Part-B positions only.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from glm_train.config import ModelConfig, PositionEncoding
from glm_train.model.embedding import GLMEmbedding
from glm_train.model.layer import GLMBlock
from glm_train.model.mask import attention_mask
from glm_train.model.rope import rope_tables
from glm_train.train.loss import GLMHeadLoss


class EmbeddingPipe(GLMEmbedding):
    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        input_ids, position_ids, prefix_lengths = inputs
        return super().forward(input_ids), position_ids, prefix_lengths


def _hold_for_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    # Keeps the tied embedding on the last stage (DeepSpeed then syncs its gradient with the first
    # stage); the projection itself happens in GLMHeadLoss, on the scored positions only.
    return hidden


class BlockPipe(GLMBlock):
    def __init__(self, cfg: ModelConfig, layer_number: int, seed: int,
                 recompute: frozenset[str] = frozenset()) -> None:
        super().__init__(cfg, layer_number, seed, recompute)
        self.head_dim = cfg.hidden // cfg.heads
        self.rope_base = cfg.rope_base
        self.two_d = PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        hidden, position_ids, prefix_lengths = inputs
        # Recomputed per layer: a few element-wise ops, cheaper than sending [S, S] masks between stages.
        cos, sin = rope_tables(position_ids, self.head_dim, self.rope_base, self.two_d, hidden.dtype)
        mask = attention_mask(prefix_lengths, hidden.shape[1], self.attention.impl)
        return super().forward(hidden, cos, sin, mask), position_ids, prefix_lengths


class FinalLayerNormPipe(nn.LayerNorm):
    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:  # type: ignore[override]
        return super().forward(inputs[0])


def glm_partition(num_blocks: int, num_stages: int) -> list[int]:
    """Stage boundaries over the layer list, GLM-130B style.

    The embedding and the head (final LayerNorm + tied head) each count as one block, and the
    N+2 slots are spread evenly: 70 blocks on 8 stages give 8, 9, ..., 9, 8 blocks.
    """
    from deepspeed.runtime.utils import partition_uniform

    slots = partition_uniform(num_items=num_blocks + 2, num_parts=num_stages)
    # Slot i is layer i for i <= N (slot 0: embedding, 1..N: blocks); the last slot is the two
    # head layers N+1 and N+2.
    return [0] + [int(b) for b in slots[1:-1]] + [num_blocks + 3]


class GLMPipelineModule(PipelineModule):
    """PipelineModule with GLM-130B's partitioning as ``partition_method="glm"``."""

    def __init__(self, *args, num_blocks: int, **kwargs) -> None:
        self._num_blocks = num_blocks
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if method.lower() != "glm":
            return super()._partition_layers(method)
        self.parts = glm_partition(self._num_blocks, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        if self.global_rank == 0:
            sizes = [self.parts[i + 1] - self.parts[i] for i in range(self.num_stages)]
            print(f"pipeline partition (glm): layers per stage {sizes}", flush=True)
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])
        return None


def glm_pipeline(cfg: ModelConfig, seed: int, topology, partition: str = "glm",
                 activation_checkpoint_interval: int = 0,
                 selective_recompute: frozenset[str] = frozenset()) -> PipelineModule:
    """Layer 0: embedding; 1..N: blocks; N+1: final LayerNorm; N+2: tied head."""
    assert cfg.vocab_size is not None
    specs = [TiedLayerSpec("embedding", EmbeddingPipe, cfg.vocab_size, cfg.hidden, std=cfg.init_std, seed=seed)]
    specs += [LayerSpec(BlockPipe, cfg, i, seed, selective_recompute) for i in range(cfg.layers)]
    specs.append(LayerSpec(FinalLayerNormPipe, cfg.hidden, eps=cfg.layernorm_eps))
    specs.append(TiedLayerSpec("embedding", EmbeddingPipe, cfg.vocab_size, cfg.hidden, std=cfg.init_std,
                               seed=seed, forward_fn=_hold_for_head))
    module = GLMPipelineModule(layers=specs, topology=topology, partition_method=partition,
                               activation_checkpoint_interval=activation_checkpoint_interval,
                               checkpointable_layers=["BlockPipe"], num_blocks=cfg.layers)
    if module.stage_id == module.num_stages - 1:
        module.loss_fn = GLMHeadLoss(module.tied_modules["embedding"])
    return module
