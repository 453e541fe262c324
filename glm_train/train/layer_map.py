"""Where each parameter of the plain GLMModel sits in the pipeline's layer list (no DeepSpeed import).

Pipeline layers (train/pipeline.py): 0 = embedding, 1..N = blocks, N+1 = final LayerNorm,
N+2 = the tied embedding again (the head), which holds no tensors of its own in a checkpoint.
"""

from __future__ import annotations


def pipeline_to_model_key(layer_idx: int, name: str, num_layers: int) -> str | None:
    """Map a pipeline layer's parameter name to the plain GLMModel's (None for the tied duplicate)."""
    if layer_idx == 0:
        return f"embedding.{name}"
    if 1 <= layer_idx <= num_layers:
        return f"layers.{layer_idx - 1}.{name}"
    if layer_idx == num_layers + 1:
        return f"final_layernorm.{name}"
    return None
