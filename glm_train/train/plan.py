"""Memory and time planner: per-GPU memory of a layout, the pipeline bubble, the step time at an MFU.

Every term is per GPU, for the pipeline stage that needs the most, in bytes:

weights      P * w                      P: parameters on the stage / TP (LayerNorms replicated),
                                        w = 2 bytes (bf16/fp16) or 4 (fp32)
gradients    P * w                      the model's own .grad
             + P * 4                    bf16/fp16 with train.grad_accum_fp32: the FP32 sums (grad_accum.py)
optimizer    P * (8 + m) / Z            Adam moments (8) + FP32 master (m = 4, 0 in fp32) ...
             + P * 4 / Z                ... + the FP32 gradient partition of the step; Z = dp with ZeRO-1
activations  per layer and micro-batch, with s sequence, b micro-batch, h hidden, a heads, I GeGLU
             size, t TP, in units of s*b*h bytes at 2-byte activations (x2 in fp32):
               10 + (16 + 8 I / h) / t  (Megatron-LM's 34sbh accounting with the 4h GELU MLP replaced
                                         by GeGLU: fc_in output 2I, gelu(gate) I, product I)
               + 5 a s / (h t)          only for attention that materializes the scores (eager, and
                                        SDPA on CPU with a mask), whose backward also holds two FP32
                                        b a s^2 / t gradients of one layer; SDPA's fused GPU kernels
                                        keep O(s)
             with activation checkpointing: 2 (the layer input) per layer, plus one recomputed
             chunk of `interval` layers in full during the backward pass
             x in-flight micro-batches: 1F1B keeps min(pp - stage, m) on a stage (m micro-batches
             per pipeline); the last stage also holds the head's logits on the scored positions:
             b * s * f * V / t * 10 bytes (bf16 logits, FP32 copy, saved softmax), f ~ 0.5
overhead     5% on top (allocator fragmentation, communication buffers, workspace)

Checked against measured peaks (docs/performance.md) and the GLM-130B layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glm_train.config import AttentionImpl, GLMConfig, ModelConfig, Precision
from glm_train.train.flops import model_flops_per_token

GIB = 1024**3
OVERHEAD = 1.05
SCORED_FRACTION = 0.5


def block_params(m: ModelConfig) -> int:
    h, f = m.hidden, m.ffn_size()
    return (3 * h * h + 3 * h) + (h * h + h) + (2 * f * h + 2 * f) + (f * h + h) + 4 * h


def stage_blocks(layers: int, pp: int, partition: str = "glm") -> list[int]:
    """Transformer blocks on each pipeline stage."""
    if pp == 1:
        return [layers]
    if partition == "glm":
        from glm_train.train.pipeline import glm_partition

        parts = glm_partition(layers, pp)
    else:  # uniform over the layer list [embedding, blocks..., final LayerNorm, head]
        from deepspeed.runtime.utils import partition_uniform

        parts = partition_uniform(num_items=layers + 3, num_parts=pp)
    return [sum(1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= layers) for s in range(pp)]


@dataclass
class StageMemory:
    stage: int
    params: float
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return OVERHEAD * (self.weights + self.gradients + self.optimizer + self.activations + self.logits)


def activation_bytes_per_layer(cfg: GLMConfig, device: str = "gpu") -> float:
    """Stored activations of one block for one micro-batch (module docstring); on CPU, SDPA with a mask
    runs its math path and keeps the score matrices like the eager kernel."""
    m, t = cfg.model, cfg.parallel.tp
    s, b, h = m.seq_length, cfg.train.micro_batch, m.hidden
    units = 10 + (16 + 8 * m.ffn_size() / h) / t
    if m.attention_impl == AttentionImpl.eager or device == "cpu":
        units += 5 * m.heads * s / (h * t)
    per_elem = 2 if cfg.precision != Precision.fp32 else 4
    return s * b * h * units * per_elem / 2


def plan(cfg: GLMConfig, world_size: int, device: str = "gpu") -> dict[str, Any]:
    """The per-GPU memory of each stage (bytes), bubble and FLOPs of ``cfg`` on ``world_size`` devices
    (``device``: gpu, or cpu for runs on CPUs)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp = p.tp, p.pp
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of tp*pp={tp * pp}")
    dp = world_size // (tp * pp)
    micro_per_pipe = t.global_batch // (t.micro_batch * dp)
    vocab = m.vocab_size or 0
    w = 4 if cfg.precision == Precision.fp32 else 2
    zero = dp if p.zero_stage >= 1 else 1
    per_layer = activation_bytes_per_layer(cfg, device)
    k = p.activation_checkpoint_interval
    s, b, h = m.seq_length, t.micro_batch, m.hidden
    stages = []
    for i, blocks in enumerate(stage_blocks(m.layers, pp, p.partition)):
        params = blocks * block_params(m) / tp
        if i == 0 or i == pp - 1:
            params += vocab * h / tp  # the embedding, and its tied copy for the head on the last stage
        if i == pp - 1:
            params += 2 * h
        grads = params * w + (params * 4 if w == 2 and t.grad_accum_fp32 else 0)
        optim = params * (8 + (4 if w == 2 else 0)) / zero + params * 4 / zero
        if k > 0:
            one_mb = blocks * s * b * h * w + min(k, blocks) * per_layer
        else:
            one_mb = blocks * per_layer
        inflight = min(pp - i, max(1, micro_per_pipe))
        # Backward of a materialized softmax: gradients of the scores and probabilities, FP32, one layer
        # at a time, on top of what is stored.
        if m.attention_impl == AttentionImpl.eager or device == "cpu":
            one_mb += 2 * 4 * b * (m.heads / tp) * s * s / inflight
        logits = b * s * SCORED_FRACTION * vocab / tp * 10 if i == pp - 1 else 0.0
        stages.append(StageMemory(i, params, params * w, grads, optim, one_mb * inflight, logits))
    worst = max(stages, key=lambda st: st.total)
    tokens = t.global_batch * m.seq_length
    flops = tokens * model_flops_per_token(m, m.seq_length, SCORED_FRACTION)
    bubble = (pp - 1) / (micro_per_pipe + pp - 1)
    return {"dp": dp, "micro_batches_per_pipeline": micro_per_pipe, "bubble": bubble, "stages": stages,
            "worst": worst, "model_flops_per_step": flops, "tokens_per_step": tokens}


def step_time(result: dict[str, Any], world_size: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per step if every GPU sustains ``mfu`` of ``peak_tflops`` (the bubble is inside MFU)."""
    return result["model_flops_per_step"] / (world_size * peak_tflops * 1e12 * mfu)
