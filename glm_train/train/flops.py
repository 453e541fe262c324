"""FLOPs per trained token of a GLM model, for throughput and MFU figures.

Only matrix multiplications are counted (one multiply-add = 2 FLOPs); LayerNorms, GeLU, RoPE,
softmax, dropout, the embedding lookup and the optimizer are left out, as in the usual MFU
convention (Megatron-LM, PaLM appendix B). With h = hidden, I = the GeGLU inner size
(``ModelConfig.ffn_size()``: 8/3 h rounded up to a multiple of 64 unless set), s = sequence length,
V = padded vocabulary and N = layers, one token's forward pass costs per layer

    2 * (3h*h + h*h)     fused QKV projection and the attention output projection
    2 * (h*2I + I*h)     GeGLU: fused [gate; up] h -> 2I, then down I -> h
    2 * 2 * s * h        Q K^T and probabilities x V, over all s keys

The attention term counts the whole s x s score matrix: GLM's Part A is bidirectional, so a token
may see keys after it, and the masked SDPA/eager kernels compute every score anyway. The output head
(tied embedding, ``logits = h E^T``) adds ``2 * h * V`` per *scored* token: our loss
(``GLMHeadLoss``) runs the head on the Part-B positions only, so it is multiplied by
``scored_fraction`` (1.0 gives the figure of a model that scores every position, as GLMModel's
forward does; a GLM batch scores on average a bit under half). Training costs 3x the forward pass
(the backward computes the input and the weight gradients, each as large as the forward matmul).

Example, configs/model/glm-1b.yaml (N=24, h=2048, I=5504, s=2048) with V=50,432: 117.96 MFLOP per
block per token, 206.57 MFLOP for the head, so 9.113 GFLOP per trained token with the head on every
position and 8.803 GFLOP with it on half of them (Part B), against 6 x 1.214e9 = 7.286 GFLOP from the
"6 x parameters" rule, which leaves out attention's 4sh and the head.

Activation checkpointing recomputes each transformer block's forward in the backward pass: that is
work the hardware does but the model does not need, so it enters :func:`hardware_flops_per_token`
(for HFU) and not :func:`model_flops_per_token` (for MFU). Selective recomputation of "attention"
(``parallel.selective_recompute``) runs each block's attention kernel once more, 2 * 2 * s * h per token
per layer (only Q K^T, half that, on the eager path), even in blocks that are also recomputed whole (their replay stores the kernel's inputs
again and recomputes it once more in backward); "geglu" recomputes no matmul.
"""

from __future__ import annotations

from collections.abc import Iterable

from glm_train.config import AttentionImpl, ModelConfig


def block_forward_flops_per_token(model_cfg: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs of one transformer block per token (matmuls only)."""
    h, f, s = model_cfg.hidden, model_cfg.ffn_size(), seq_length
    projections = 2 * (3 * h * h + h * h)
    geglu = 2 * (h * 2 * f + f * h)
    attention = 2 * 2 * s * h
    return float(projections + geglu + attention)


def head_forward_flops_per_token(model_cfg: ModelConfig) -> float:
    """Forward FLOPs of the tied output head per scored token."""
    if model_cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be resolved (from the tokenizer) to count the head's FLOPs")
    return float(2 * model_cfg.hidden * model_cfg.vocab_size)


def model_flops_per_token(model_cfg: ModelConfig, seq_length: int, scored_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), without recomputation.

    ``scored_fraction``: the share of positions whose logits are computed (Part B in our loss).
    """
    if not 0.0 <= scored_fraction <= 1.0:
        raise ValueError(f"scored_fraction must lie in [0, 1], got {scored_fraction}")
    blocks = model_cfg.layers * block_forward_flops_per_token(model_cfg, seq_length)
    head = scored_fraction * head_forward_flops_per_token(model_cfg)
    return 3.0 * (blocks + head)


def recomputed_blocks(layers: int, activation_checkpoint_interval: int) -> int:
    """Transformer blocks that DeepSpeed recomputes in the backward pass of a one-stage (pp=1) pipeline.

    The stage's layer list is [embedding, block 1..N, final LayerNorm, head], cut into chunks of
    ``interval`` layers from the start; only chunks made of blocks alone are checkpointed
    (``checkpointable_layers=["BlockPipe"]`` in ``train/pipeline.py``). Interval 1 recomputes every
    block; interval K > 1 leaves out the blocks that share a chunk with the embedding or the head.
    """
    k = activation_checkpoint_interval
    if k <= 0:
        return 0
    total = 0
    for start in range(0, layers + 3, k):
        idx = range(start, min(start + k, layers + 3))
        if all(1 <= i <= layers for i in idx):
            total += len(idx)
    return total


def hardware_flops_per_token(
    model_cfg: ModelConfig,
    seq_length: int,
    scored_fraction: float = 1.0,
    activation_checkpoint_interval: int = 0,
    selective_recompute: Iterable[str] = (),
) -> float:
    """FLOPs the hardware executes per token: the model's, plus one more forward of each block that
    activation checkpointing recomputes (:func:`recomputed_blocks`; all of them at interval 1), plus
    the attention kernel of every block under selective "attention" recomputation. The embedding and
    the head are never recomputed."""
    total = model_flops_per_token(model_cfg, seq_length, scored_fraction)
    n = recomputed_blocks(model_cfg.layers, activation_checkpoint_interval)
    total += n * block_forward_flops_per_token(model_cfg, seq_length)
    if "attention" in selective_recompute:
        # Non-reentrant checkpointing stops replaying once every saved tensor is back: a fused SDPA
        # kernel saves its output, so it reruns whole (split: both of its calls, the work of one full
        # attention by the model FLOPs' convention); the eager path's P V matmul saves only its
        # inputs, so only Q K^T reruns.
        matmuls = 1 if AttentionImpl(model_cfg.attention_impl) == AttentionImpl.eager else 2
        total += model_cfg.layers * matmuls * 2 * seq_length * model_cfg.hidden
    return total


def recomputes(activation_checkpoint_interval: int, selective_recompute: Iterable[str]) -> bool:
    """Whether the hardware repeats any matmul (then HFU differs from MFU)."""
    return activation_checkpoint_interval > 0 or "attention" in selective_recompute
