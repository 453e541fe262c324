"""Memory and time planner: per-GPU memory of a layout, the pipeline bubble, the step time at an MFU.

Every term is per GPU, for the pipeline stage that needs the most, in bytes. P: parameters on the
stage / TP (LayerNorms replicated); w: bytes of a weight or activation element, 2 (bf16/fp16) or 4
(fp32); Z = dp with ZeRO-1, else 1; s sequence, b micro-batch, h hidden, a heads, I GeGLU size, t TP,
V padded vocabulary.

weights      P * w
gradients    P * w                      the model's own .grad; bf16/fp16 with train.grad_accum_fp32 and
             or P * 4                   more than one micro-batch per step: the FP32 sums instead
                                        (grad_accum.py), which take each .grad as backward makes it and
                                        hand it back, rounded, only for the step. The first micro-batch's
                                        gradients stay P * w until the second backward converts them
                                        block by block (so with two micro-batches P * w at the loss)
optimizer    P * (8 + 4) / Z            ZeRO-1: Adam moments and the FP32 master partition (DeepSpeed
                                        clones it even in fp32) ...
step         + P * 4 / Z                ... and, during the step only, the FP32 gradient partition.
                                        Without ZeRO: fp32 hands torch's AdamW the model itself (P * 8,
                                        no step buffer); DeepSpeed's bf16 optimizer keeps FP32 master and
                                        gradients (P * 16), its fp16 one the master (P * 12) and makes
                                        the FP32 gradients in the step (P * 4) (read, not measured).
                                        train.optimizer_impl=foreach adds P * 4 / Z to the step (an FP32
                                        temporary of every parameter); fused (default) adds nothing
ZeRO buckets R * w                      ZeRO-1's reduction bucket of R = min(5e8, P) elements (the
                                        engine caps DeepSpeed's reduce_bucket_size default at the
                                        stage's parameters) or parallel.zero_bucket_elements, made at a
                                        micro-batch's first gradient, and a second one when the step's
                                        reduction starts (2 R w); both freed before the FP32 partition
                                        is made
activations  what autograd keeps of one block for one micro-batch (activation_bytes_per_layer), per
             s*b*h element unless marked, checked tensor by tensor in tests/test_plan.py:
               4w                       block input (LN1's), LN1 output (QKV input and residual), LN2
                                        input, LN2 output (GeGLU input); replicated over TP ranks
               + 2d                     hidden dropout masks (dropout > 0): d = 1 (CUDA's bool mask) or
                                        w (CPU keeps the scaled noise)
               + 2w / a                 RoPE cos/sin [b, s, h/a], rebuilt in every layer (BlockPipe)
               + (A + 4I w / h) / t     attention and GeGLU (dense_in output 2I, gelu(gate) I, product I)
               + M * b*s*s              the [b, 1, s, s] mask, replicated over heads and TP ranks
               + S * b*a*s*s / t        attention matrices, for kernels that keep them
             with A, M, S by attention path:
               SDPA (fused)  A = 4w (rotated q, k and v's copy, made by rotary_qkv, which lets the
                             QKV output go; the kernel output, of which the dense input is a view) +
                             4a/h (FP32 logsumexp); M = w (the bool mask turned additive); S = 0.
                             CUDA's memory-efficient kernel (the one that takes a mask) and CPU's
                             flash kernel keep the same set
               SDPA and split on CPU in bf16/fp16 (no attention dropout): run in FP32 (faster there):
                             A = 16 (FP32 q, k, v copies and output) + w (the cast back, the dense
                             input) + 4a/h, M = 4 (the additive mask in FP32); split: A = 16 + 4 (1 - f)
                             + w + (2 - f) 4a/h, M = 0
               SDPA on CPU with attention dropout: the math path in FP32: A = 12 + w (FP32 q, k, v, the
                             context copy), M = 0, S = 12 (FP32 softmax, dropout noise, dropped probs)
               eager         A = 4w (scaled q, rotated k, contiguous v, context copy); M = 1 (~mask);
                             S = 4 (FP32 softmax) + w (its bf16/fp16 cast, 0 in fp32) without attention
                             dropout, 4 + d + w (softmax, mask, dropped probs) with it
               split         (two mask-free SDPA calls, causal and Part A) A = 5w (rotated q, k; v's
                             copy; causal output; the rows assembled in the dense's input layout) +
                             (1 - f) w (Part-A output) + (2 - f) 4a/h (logsumexps), M = 0, S = 0;
                             on CPU with attention dropout two FP32 math-path calls: A = 12 + 12 (1 - f)
                             + w (fp32: 12 + 8 (1 - f) + 2w, a Part-A view of v keeping v's copy),
                             S = 12 (1 + (1 - f)^2), taking sum(Part A^2) ~ b (1 - f)^2 s^2
               blocks        (CPU; GPUs run split) per sample and query block: fp32 through the
                             flash kernel, A = 4w + 4a/h, M = 0 (no mask: one causal table per
                             sequence length); bf16/fp16 where the CPU upcasts: A = 16 + w + 4a/h,
                             M = 0; bf16 elsewhere through matmuls: A = 4w (rotated q, k, v's copy,
                             output), M = 0, S = w c with c the share of scores its blocks compute
                             at Part A = (1 - f) s (0.75 for s = 512), its kept probabilities;
                             attention dropout, samples below prefix_blocks.MIN_SCORES (heads per
                             TP rank x s x s), bf16 beyond s = 1024 (MATMUL_MAX_SEQ) and fp32 with
                             more threads than heads per TP rank
                             (judged on the planning process) run SDPA's masked kernel (above)
             parallel.selective_recompute drops, per block:
               attention     A = 4w (the QKV output, the checkpoint's input; the context),
                             M = 1 (the bool mask input; 0 for split and blocks), S = 0, whatever the
                             kernel
               geglu         gelu(gate): 4I w / h becomes 3I w / h
             train.compile keeps what selective geglu keeps (Inductor's partitioner recomputes
             gelu(gate) itself), and its hidden dropout masks are bool on CPU too. Measured peaks
             against this rule: plan_check CPU fp32 1.470 against 1.471 GiB and bf16 1.210 against
             1.215; glm-1b bf16 on an H200, 115.6 against 115.5 GiB at micro-batch 24 and 50.4
             against 50.0 at 8; one compiled block's saved tensors in tests/test_plan.py (sdpa,
             split, blocks; within 2%), where the S x S dropout mask of CPU's math path is bool
             too. Not modelled: eager attention compiled, whose S x S tensors Inductor partly
             recomputes (13% of a bf16 block less than estimated, measured once)
             in-flight: 1F1B keeps min(pp - stage, m) micro-batches on a stage (m micro-batches per
             pipeline); per micro-batch a stage keeps, for each block, all of the above, or with
             parallel.activation_checkpoint_interval = k only each checkpointed chunk's input (s*b*h*w;
             DeepSpeed runs a chunk that mixes blocks with the embedding or head unchecked), plus the
             stage's output (s*b*h*w; the last stage's is the final LayerNorm's), which DeepSpeed holds
             until the micro-batch's backward pass is over
peak phases  the activations above peak at the first backward op of a stage's step, on top of:
               head      (last stage) the final LayerNorm's input and the scored hidden states
                         (1 + f) s*b*h*w, f ~ 0.5 Part-B tokens, and with the whole head
                         (train.head_chunk = 0) 12 bytes per scored logit: f s b V / t of them
                         (FP32 log-softmax output, its incoming gradient and its result; the bf16
                         logits and their FP32 copy are gone by then); with the fused head in chunks
                         of c tokens, at the forward's last chunk, the scored states' gradient
                         f s*b*h*w, the FP32 weight gradient 4 V h / t and 4 + w bytes per logit of
                         one chunk, min(c, f s b) V / t (its bf16 logits and their FP32 copy, then the
                         FP32 softmax and its bf16 gradient; in FP32 the one tensor, 4 bytes;
                         under train.compile in bf16 at t = 1, 2w: the logits and their gradient),
                         or, where larger (2-byte precisions), the chunk's gradient w per logit
                         beside its weight-gradient product w V h / t, on a CPU plus its FP32 copy
                         4 V h / t
               backward  (every stage, when larger) one block's backward: w s*b*h (2 + 2I / (h t)) for
                         the incoming gradient, the one LN2 accumulates and the GeGLU gradients
                         (+ I / (h t) when geglu is recomputed), or, when attention matrices are rebuilt
                         or kept, what the recomputed attention and its FP32 score gradients
                         (4 + w) b*a*s*s / t (the bf16 blocks kernel: one sample's block at a
                         time, 12 a min(s, 256) s / t) need beyond the GeGLU memory freed by then;
                         with k > 0 also one recomputed chunk of min(k, blocks) blocks and its output (s*b*h*w)
             gradients count towards that peak when they already exist, i.e. when the stage runs more
             micro-batches than it keeps in flight (the engine frees .grad after each step); otherwise
             the first backward makes them block by block as it frees activations, and where a block's
             gradient outweighs what the block frees (recomputation) the difference accumulates over
             the stage's blocks, and ZeRO's first bucket exists from the first gradient on; the
             optimizer step is the other candidate peak: weights + optimizer + the largest of gradients
             + bucket (FP32 sums up to the flush), P * w gradients + 2 buckets (the reduction), and
             P * w gradients + step
overhead     5% on top (allocator fragmentation, communication buffers, workspace)

Checked against the peak of live tensor bytes of CPU training runs (benchmarks/plan_check.py,
docs/performance.md), CUDA's max_memory_allocated where a GPU was lent, and the GLM-130B layout.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from glm_train.config import AttentionImpl, GLMConfig, ModelConfig, OptimizerImpl, Precision, head_chunk
from glm_train.train.flops import model_flops_per_token

GIB = 1024**3
OVERHEAD = 1.05
SCORED_FRACTION = 0.5
LOGIT_BYTES = 12
"""Bytes per scored logit at the loss's backward: three FP32 [tokens, V/t] tensors (see the docstring)."""
ZERO_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default zero_optimization.reduce_bucket_size: the engine's cap on one ZeRO bucket."""


def zero_bucket_elements(local_params: float, configured: int | None = None) -> int:
    """Elements of one ZeRO reduction bucket for a rank holding ``local_params`` parameters:
    ``configured`` (parallel.zero_bucket_elements) if set.

    DeepSpeed allocates its buckets at full size every step, however few gradients they will hold: at
    its default, 2 x 5e8 elements (4 GB in FP32) for a 30M-parameter model, mapped and page-faulted in
    again each step on CPU and held by CUDA's caching allocator on a GPU. A bucket that holds every
    local gradient reduces them in one piece, as the default does for such a model, so capping it
    there changes no result (glm_train/train/engine.py sets it).
    """
    if configured is not None:
        return configured
    return max(1, min(ZERO_BUCKET_ELEMENTS, int(local_params)))


def block_params(m: ModelConfig) -> int:
    h, f = m.hidden, m.ffn_size()
    return (3 * h * h + 3 * h) + (h * h + h) + (2 * f * h + 2 * f) + (f * h + h) + 4 * h


def stage_layers(layers: int, pp: int, partition: str = "glm") -> list[range]:
    """Pipeline layer indices of each stage: 0 embedding, 1..layers blocks, then final LayerNorm, head."""
    if pp == 1:
        return [range(0, layers + 3)]
    if partition == "glm":
        from glm_train.train.pipeline import glm_partition

        parts = glm_partition(layers, pp)
    else:  # uniform over the layer list [embedding, blocks..., final LayerNorm, head]
        from deepspeed.runtime.utils import partition_uniform

        parts = partition_uniform(num_items=layers + 3, num_parts=pp)
    return [range(parts[s], parts[s + 1]) for s in range(pp)]


def stage_blocks(layers: int, pp: int, partition: str = "glm") -> list[int]:
    """Transformer blocks on each pipeline stage."""
    return [sum(1 for i in r if 1 <= i <= layers) for r in stage_layers(layers, pp, partition)]


def _element_bytes(cfg: GLMConfig) -> int:
    return 4 if cfg.precision == Precision.fp32 else 2


def _torch_dtype(cfg: GLMConfig) -> Any:
    """The model's torch dtype for ``cfg.precision``."""
    import torch

    return {Precision.fp32: torch.float32, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[cfg.precision]


def _cpu_upcasts(cfg: GLMConfig) -> bool:
    import torch

    from glm_train.model.attention import cpu_attention_upcasts

    return cpu_attention_upcasts(torch.float16 if cfg.precision == Precision.fp16 else torch.bfloat16)


def _blocks_kernel(cfg: GLMConfig, device: str) -> str | None:
    """model/prefix_blocks.py's kernel for this config ("flash", "matmul"), judged on this process's
    threads, or None where attention_impl is not blocks on a CPU or blocks hands it to the masked kernel."""
    import torch

    from glm_train.model import prefix_blocks

    if device != "cpu" or AttentionImpl(cfg.model.attention_impl).resolve(device) != AttentionImpl.blocks:
        return None
    # Half precision is upcast to FP32 on CPUs without native bf16 dot products.
    dtype = torch.float32 if _element_bytes(cfg) == 4 or _cpu_upcasts(cfg) else _torch_dtype(cfg)
    return prefix_blocks.kernel(dtype, cfg.model.attention_dropout, cfg.model.heads // cfg.parallel.tp,
                                cfg.model.seq_length)


def _kept_probabilities(cfg: GLMConfig) -> float:
    """The matmul kernel's probabilities per b*a*s*s: bf16, over the share of scores its blocks compute
    for a sample whose Part A is the planner's mean."""
    from glm_train.model import prefix_blocks

    s = cfg.model.seq_length
    a = round((1 - SCORED_FRACTION) * s)
    return _element_bytes(cfg) * prefix_blocks.computed_fraction(a, s)


def _attention_terms(cfg: GLMConfig, device: str, recompute: bool) -> tuple[float, float, float]:
    """(A per s*b*h / t, M per b*s*s, S per b*a*s*s / t) of the attention path (module docstring)."""
    m = cfg.model
    w = _element_bytes(cfg)
    compiled = cfg.train.compile
    drop_mask = w if device == "cpu" and not compiled else 1  # Inductor keeps bool masks
    impl = AttentionImpl(m.attention_impl).resolve(device)
    if impl == AttentionImpl.blocks and device != "cpu":
        impl = AttentionImpl.split  # blocks is a CPU kernel; elsewhere it runs split
    part_a = 1 - SCORED_FRACTION
    if recompute:  # split and blocks take Part-A lengths, no [b, 1, s, s] mask
        return 4 * w, 0 if impl in (AttentionImpl.split, AttentionImpl.blocks) else 1, 0
    math_path = device == "cpu" and m.attention_dropout > 0  # CPU's fused SDPA has no dropout
    lse = 4 * m.heads / m.hidden  # the kernel's FP32 logsumexp [b, H, s]
    blocks = _blocks_kernel(cfg, device)
    if impl == AttentionImpl.blocks and blocks is None:
        impl = AttentionImpl.sdpa  # blocks hands these to the masked kernel (model/attention.py)
    if blocks == "matmul":
        # model/prefix_blocks.py's matmul kernel: rotated q, k, v's copy and the output (the dense
        # input is a view of it), no mask, and the probabilities of every block.
        return 4 * w, 0, _kept_probabilities(cfg)
    if blocks == "flash":
        # model/prefix_blocks.py: FP32 q, k, v and output, logsumexp, no mask (its causal table is
        # one per sequence length, not per layer); in half precision the FP32 copies of q, k, v and
        # the output (the half-precision ones are not kept) and the dense layer's cast back.
        return (4 * w if w == 4 else 16 + w) + lse, 0, 0
    if device == "cpu" and w == 2 and impl != AttentionImpl.eager and not math_path and _cpu_upcasts(cfg):
        # CPU runs half-precision attention in FP32 unless it has native bf16 dot products (AMX,
        # AVX512-BF16: model/attention.py's cpu_attention_upcasts, judged on the CPU this runs on):
        # the kernel keeps FP32 copies of q, k, v and its FP32 output (split: plus the Part-A
        # call's), the dense layer the cast back. The rotated half-precision q, k and the QKV
        # output are not kept; SDPA's additive mask is FP32.
        if impl == AttentionImpl.split:
            return 16 + 4 * part_a + w + (2 - SCORED_FRACTION) * lse, 0, 0
        return 16 + w + lse, 4, 0
    if impl == AttentionImpl.split and not math_path:
        # Causal call: rotated q, k, the copy of v (model/rope.py: rotary_qkv), its output, logsumexp;
        # Part-A call: its output and logsumexp on the Part-A rows; the rows assembled into a
        # [b, s, H, D] buffer, the dense's input (model/attention.py: _assemble).
        return 5 * w + part_a * w + (2 - SCORED_FRACTION) * 4 * m.heads / m.hidden, 0, 0
    if impl == AttentionImpl.split:  # two math-path calls in FP32: q, k, v copies and matrices of each
        # In fp32 the Part-A slice of v stays a view of v's copy, which it then keeps whole.
        v_part_a = w if w == 4 else 4 * part_a
        return 12 + 8 * part_a + v_part_a + w, 0, 12 * (1 + part_a**2)
    if impl == AttentionImpl.sdpa and not math_path:
        # q, k, v: rotary_qkv's [b, s, H, D] tensors; the output is laid out like q (CPU) or
        # [b, s, H, D] anyway (CUDA), so the dense input is a view of it.
        return 4 * w + 4 * m.heads / m.hidden, w, 0
    if impl == AttentionImpl.sdpa:  # SDPA's math path: FP32 probabilities, dropout mask, dropped ones
        return 3 * 4 + w, 0, 8 + (1 if compiled else 4)
    scores = 4 + (drop_mask + w if m.attention_dropout > 0 else (w if w == 2 else 0))
    return 4 * w, 1, scores


def recomputed_parts(cfg: GLMConfig) -> set[str]:
    """The block parts whose tensors backward rebuilds instead of keeping (docstring, "compile").

    ``parallel.selective_recompute``, and with ``train.compile`` also geglu: Inductor's partitioner
    recomputes gelu(gate) from the saved gate instead of keeping it, and a compiled block keeps
    what the geglu rule says to within 0.5% (CPU fp32 and bf16, H200 bf16 at micro-batches 8 and 24).
    """
    return set(cfg.parallel.selective_recompute) | ({"geglu"} if cfg.train.compile else set())


def activation_bytes_per_layer(cfg: GLMConfig, device: str = "gpu", selective: bool = True) -> float:
    """Bytes autograd keeps of one block for one micro-batch (module docstring, "activations").

    ``device``: gpu or cpu (dropout masks and SDPA's kernel choice differ); ``selective=False`` ignores
    ``parallel.selective_recompute`` (what the block holds while its recomputed parts are rebuilt).
    """
    m, t = cfg.model, cfg.parallel.tp
    s, b, h, a, f = m.seq_length, cfg.train.micro_batch, m.hidden, m.heads, m.ffn_size()
    w = _element_bytes(cfg)
    parts = recomputed_parts(cfg) if selective else set()
    # LayerNorm mean and rstd [b, s, 1] each: FP32 on CUDA, the input's dtype on CPU (negligible).
    stats = 2 * 2 * (w if device == "cpu" else 4) / h
    replicated = 4 * w + 2 * w / a + stats
    if m.dropout > 0:  # two masks: bool on CUDA and in compiled blocks, the input's dtype in eager CPU
        replicated += 2 * (w if device == "cpu" and not cfg.train.compile else 1)
    attn, mask, scores = _attention_terms(cfg, device, "attention" in parts)
    mlp = (3 if "geglu" in parts else 4) * f / h * w
    return s * b * h * (replicated + (attn + mlp) / t) + b * s * s * mask + b * a / t * s * s * scores


def backward_working_bytes(cfg: GLMConfig, device: str = "gpu") -> float:
    """Memory one block's backward pass needs beyond what its micro-batch has stored (docstring, "backward").

    Measured with the CPU profiler on one block: the GeGLU gradients set it unless attention matrices
    are rebuilt (selective recompute) or kept and their FP32 gradients outgrow the GeGLU memory freed
    by the time the attention's backward runs.
    """
    m, t = cfg.model, cfg.parallel.tp
    s, b, h, a, f = m.seq_length, cfg.train.micro_batch, m.hidden, m.heads, m.ffn_size()
    w = _element_bytes(cfg)
    sbh = s * b * h
    parts = recomputed_parts(cfg)
    # The block's incoming gradient and the one LN2's output accumulates (the residual branch runs
    # first), then GeGLU's: its product's and gelu(gate)'s and up's, less the product the dense layer has
    # freed by then (measured: 2I, not 3I); gelu(gate) rebuilt on top when recomputed.
    mlp_phase = sbh * w * (2 + (2 + ("geglu" in parts)) * f / (h * t))
    full_attn, _, full_scores = _attention_terms(cfg, device, recompute=False)
    kept_attn, _, kept_scores = _attention_terms(cfg, device, "attention" in parts)
    rebuilt = 0.0
    if "attention" in parts:  # the dropped tensors come back, plus the rotated and scaled copies of q, k
        rebuilt = sbh * (full_attn - kept_attn + 2 * w) / t + b * a / t * s * s * (full_scores - kept_scores)
    if _blocks_kernel(cfg, device) == "matmul":
        from glm_train.model import prefix_blocks

        # One block of one sample at a time: dP, the FP32 copy of P and dS, all FP32.
        score_grads = 12 * a / t * min(s, prefix_blocks.CHUNK) * s
    else:
        score_grads = b * a / t * s * s * (4 + w) if full_scores else 0.0
    freed = sbh * (2 * w + (3 if "geglu" in parts else 4) * f / h * w / t)  # LN2 input/output, GeGLU
    attn_phase = rebuilt + score_grads + 2 * sbh * w - freed
    return max(mlp_phase, attn_phase)


def head_bytes(cfg: GLMConfig, device: str = "gpu") -> float:
    """The last stage's buffers at the head's peak (docstring, "head"), per micro-batch."""
    m, t, w = cfg.model, cfg.parallel.tp, _element_bytes(cfg)
    sbh = m.seq_length * cfg.train.micro_batch * m.hidden
    scored = m.seq_length * cfg.train.micro_batch * SCORED_FRACTION
    vocab = (m.vocab_size or 0) / t
    chunk = head_chunk(cfg)
    if chunk == 0:
        return (1 + SCORED_FRACTION) * sbh * w + scored * vocab * LOGIT_BYTES
    from glm_train.parallel.cross_entropy import compiled_chunks_apply

    compiled = compiled_chunks_apply(cfg.train.compile, _torch_dtype(cfg), t)
    return ((1 + 2 * SCORED_FRACTION) * sbh * w + 4 * vocab * m.hidden
            + fused_head_transient(min(chunk, scored), vocab, m.hidden, w, compiled, device))


def fused_head_transient(rows: float, vocab: float, hidden: int, w: int, compiled: bool, device: str) -> float:
    """Bytes one chunk of ``rows`` scored tokens of the fused head holds beyond its inputs and the two
    gradients it fills (``vocab`` rows of the weight on this rank, ``w``-byte elements)."""
    # Its FP32 logits, and in 2-byte precisions their bf16 matmul output, then their gradient; with
    # the compiled chunk kernels (bf16, TP = 1) the bf16 logits and their gradient only.
    per_logit = 2 * w if compiled else 4 + (w if w < 4 else 0)
    # Then, in 2-byte precisions, the chunk's gradient beside its weight-gradient product (V/t x h),
    # which a CPU adds into the FP32 sum through an FP32 copy (CUDA casts inside the kernel).
    product = 0.0 if w == 4 else w * rows * vocab + (w + (4 if device == "cpu" else 0)) * vocab * hidden
    return max(per_logit * rows * vocab, product)


def _stored_per_microbatch(cfg: GLMConfig, device: str, layers: range) -> tuple[float, float, int]:
    """(bytes a stage keeps per in-flight micro-batch, of which for its blocks, blocks it recomputes at
    once in backward)."""
    m, p = cfg.model, cfg.parallel
    k = p.activation_checkpoint_interval
    sbh_w = m.seq_length * cfg.train.micro_batch * m.hidden * _element_bytes(cfg)
    per_layer = activation_bytes_per_layer(cfg, device)
    stored, chunk = 0.0, 0
    ids = list(layers)
    step = k if k > 0 else len(ids)
    for c in range(0, len(ids), step):
        blocks = sum(1 for i in ids[c:c + step] if 1 <= i <= m.layers)
        if k > 0 and blocks == len(ids[c:c + step]):  # a checkpointed chunk: only its input stays
            stored += sbh_w
            chunk = max(chunk, blocks)
        else:
            stored += blocks * per_layer
    # The stage's output (the last stage's: the final LayerNorm's), held by DeepSpeed's pipe buffer
    # until the micro-batch's backward pass is over.
    return stored + sbh_w, stored, chunk


@dataclass
class StageMemory:
    stage: int
    params: float
    weights: float
    gradients: float
    optimizer: float
    """Optimizer state kept between steps."""
    activations: float
    """Stored activations of the in-flight micro-batches."""
    logits: float
    """Head buffers at the loss's backward (last stage); 0 elsewhere."""
    backward: float = 0.0
    """One block's backward beyond the stored activations, incl. a recomputed chunk."""
    grads_at_peak: bool = True
    """Whether the gradients exist when the activations peak (more micro-batches than in flight)."""
    step: float = 0.0
    """Buffers of the optimizer step only (the FP32 gradient partition)."""
    bucket: float = 0.0
    """One ZeRO reduction bucket (0 without ZeRO)."""
    early_gradients: float | None = None
    """Gradient bytes at the activation peak where they differ from ``gradients`` (two micro-batches
    with FP32 sums: the first one's gradients, still in the model's dtype)."""

    def _phases(self) -> tuple[float, float]:
        """(bytes on top of weights and optimizer at the activation peak, at the optimizer step)."""
        if self.grads_at_peak:  # the previous micro-batch's gradients and bucket are there
            grads = self.gradients if self.early_gradients is None else self.early_gradients
            activation_phase = grads + self.bucket + self.activations + max(self.logits, self.backward)
        else:  # the first gradient of the step makes the bucket: not yet there at the loss
            activation_phase = self.activations + max(self.logits, self.backward + self.bucket)
        # At the step the gradients are the model's own again (P * w, the size of the weights); FP32
        # sums exist only up to the flush just before it.
        step_phase = max(self.gradients + self.bucket, self.weights + 2 * self.bucket, self.weights + self.step)
        return activation_phase, step_phase

    @property
    def peak(self) -> float:
        """Allocated bytes at the larger of the activation peak and the optimizer step."""
        return self.weights + self.optimizer + max(self._phases())

    @property
    def peak_phase(self) -> str:
        """Which phase sets the peak: "backward" (activations) or "step" (optimizer step)."""
        activation_phase, step_phase = self._phases()
        return "backward" if activation_phase >= step_phase else "step"

    @property
    def total(self) -> float:
        return OVERHEAD * self.peak


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
    w = _element_bytes(cfg)
    zero = dp if p.zero_stage >= 1 else 1
    mixed = cfg.precision != Precision.fp32
    h = m.hidden
    sbh_w = m.seq_length * t.micro_batch * h * w
    full_layer = activation_bytes_per_layer(cfg, device, selective=False)
    per_layer = activation_bytes_per_layer(cfg, device)
    working = backward_working_bytes(cfg, device)
    # grad_accum.py keeps a step's first gradient in the model's dtype and converts it to an FP32 sum
    # when the second arrives: FP32 from the second backward on (all of it by that backward's end and
    # at the flush before the step), never for a step of one micro-batch.
    fp32_sums = mixed and t.grad_accum_fp32 and micro_per_pipe > 1
    grad_w = 4 if fp32_sums else w
    stages = []
    layer_ranges = stage_layers(m.layers, pp, p.partition)
    for i, blocks in enumerate(stage_blocks(m.layers, pp, p.partition)):
        last = i == pp - 1
        params = blocks * block_params(m) / tp
        if i == 0 or last:
            params += vocab * h / tp  # the embedding, and its tied copy for the head on the last stage
        if last:
            params += 2 * h
        grads = params * grad_w
        # At the loss's backward of the second micro-batch the sums are still the first's gradients;
        # from the third micro-batch on they are FP32.
        early_grads = params * w if fp32_sums and micro_per_pipe == 2 else None
        if p.zero_stage >= 1:
            optim, step = params * (8 + 4) / zero, params * 4 / zero
        elif cfg.precision == Precision.bf16:
            optim, step = params * 16.0, 0.0
        elif cfg.precision == Precision.fp16:
            optim, step = params * 12.0, params * 4.0
        else:
            optim, step = params * 8.0, 0.0
        if OptimizerImpl(t.optimizer_impl) == OptimizerImpl.foreach:
            step += params * 4 / zero  # one FP32 temporary per parameter (measured: sqrt of the 2nd moment)
        inflight = min(pp - i, max(1, micro_per_pipe))
        stored, in_blocks, chunk = _stored_per_microbatch(cfg, device, layer_ranges[i])
        grads_live = micro_per_pipe > inflight
        # A recomputed chunk's output stays alive while its backward runs (it is what backward starts from).
        backward = working + (chunk * per_layer + sbh_w if chunk else 0.0)
        # Gradient bytes a block adds during the backward at the activation peak, while that backward
        # frees the block's activations: where they outweigh what it frees (recomputation keeps
        # little), memory grows until the last block.
        block_grad = 0.0
        if not grads_live:  # the step's first backward makes the gradients, in the model's dtype
            block_grad = block_params(m) / tp * w
            if last and blocks:
                backward += vocab * h / tp * w  # the tied head's gradient, made by the loss's backward
        elif early_grads is not None:  # the second backward turns each block's sums into FP32
            block_grad = block_params(m) / tp * (4 - w)
        if block_grad and blocks:
            backward += max(0.0, (blocks - 1) * (block_grad - in_blocks / blocks))
        logits = head_bytes(cfg, device) if last else 0.0
        stages.append(StageMemory(i, params, params * w, grads, optim, stored * inflight, logits, backward,
                                  grads_live, step, zero_bucket_elements(params, p.zero_bucket_elements) * w if p.zero_stage >= 1 else 0.0,
                                  early_grads))
    worst = max(stages, key=lambda st: st.total)
    tokens = t.global_batch * m.seq_length
    flops = tokens * model_flops_per_token(m, m.seq_length, SCORED_FRACTION)
    bubble = (pp - 1) / (micro_per_pipe + pp - 1)
    return {"dp": dp, "micro_batches_per_pipeline": micro_per_pipe, "bubble": bubble, "stages": stages,
            "worst": worst, "model_flops_per_step": flops, "tokens_per_step": tokens,
            "activations_per_layer": per_layer, "activations_per_layer_full": full_layer}


def step_time(result: dict[str, Any], world_size: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per step if every GPU sustains ``mfu`` of ``peak_tflops`` (the bubble is inside MFU)."""
    return result["model_flops_per_step"] / (world_size * peak_tflops * 1e12 * mfu)


def with_micro_batch(cfg: GLMConfig, micro_batch: int, world_size: int) -> GLMConfig:
    """A copy of ``cfg`` at ``micro_batch``, its micro-batches per pipeline kept (the global batch
    scales with the micro-batch), so FP32 gradient sums and in-flight counts stay what ``cfg`` has."""
    out = copy.deepcopy(cfg)
    t = out.train
    dp = world_size // (out.parallel.tp * out.parallel.pp)
    per_pipe = max(1, t.global_batch // (t.micro_batch * dp))
    t.micro_batch, t.global_batch = micro_batch, micro_batch * per_pipe * dp
    return out


def largest_micro_batch(cfg: GLMConfig, world_size: int, gpu_bytes: float, device: str = "gpu",
                        limit: int = 4096) -> int | None:
    """The largest micro-batch (at most ``limit``) whose plan, overhead included, fits ``gpu_bytes`` with
    ``cfg``'s micro-batches per pipeline (``with_micro_batch``); None if not even 1 fits."""

    def fits(b: int) -> bool:
        return plan(with_micro_batch(cfg, b, world_size), world_size, device)["worst"].total <= gpu_bytes

    if not fits(1):
        return None
    lo, hi = 1, 2  # memory grows with the micro-batch: double until it does not fit, then bisect
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
