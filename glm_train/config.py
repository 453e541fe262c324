"""Typed configuration: one dataclass per section, registered with Hydra as the schema.

The YAML files in ``configs/`` only set values; every key and type is declared here, so an
unknown key or a wrong type is refused by OmegaConf while composing, and the cross-field rules in
:func:`validate` run before any process group or heavy import. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class DeepNormVariant(str, enum.Enum):
    glm130b = "glm130b"  # alpha = sqrt(2N), beta = 1/sqrt(2N)
    deepnet = "deepnet"  # DeepNet decoder: alpha = (2N)^(1/4), beta = (8N)^(-1/4)


class PositionEncoding(str, enum.Enum):
    rope_1d = "rope_1d"  # GLM-130B: one position per token, rotary over the whole head dim
    rope_2d = "rope_2d"  # original GLM: (position in Part A, position within span), half the head each


class AttentionImpl(str, enum.Enum):
    sdpa = "sdpa"  # torch scaled_dot_product_attention with a boolean prefix mask
    eager = "eager"  # explicit FP32 softmax with query-key layer scaling (reference path)
    # Two mask-free SDPA calls, so GPUs can use FlashAttention: causal over the whole sequence, then
    # bidirectional over each sample's Part A, whose rows replace the causal ones.
    split = "split"
    # CPU: attention per sample over only the keys each block of queries can see (Part A alone,
    # Part B in chunks up to its own end: model/prefix_blocks.py), FP32 through the flash kernel,
    # bf16 through matmuls keeping the probabilities; the masked kernel in fp16, with attention
    # dropout, for samples too small to pay (prefix_blocks.MIN_SCORES) or in FP32 with more threads
    # than heads; split on GPUs.
    blocks = "blocks"
    # split where the tensors are on a GPU, blocks elsewhere (on one H200, glm-1b bf16 micro-batch 8:
    # split 5.6% faster than sdpa; on CPU, split is the slower one and blocks the faster, fp32
    # forward + backward of 8x8x512x64 masked attention 97 against 125 ms, bf16 80-86 against
    # 108-132 ms on AVX512-BF16)
    auto = "auto"

    def resolve(self, device: Any) -> AttentionImpl:
        """The kernel this choice means for tensors on ``device``: a torch.device, or a name such as
        "cuda", "cpu" or glm-plan's "gpu"."""
        if self != AttentionImpl.auto:
            return self
        # str(): "cuda:0" or "cpu" for a torch.device, without importing torch into the config module.
        gpu = str(device).split(":")[0] in ("cuda", "gpu")
        return AttentionImpl.split if gpu else AttentionImpl.blocks


@dataclass
class ModelConfig:
    """GLM transformer shape and numerics (SPEC.md, "Model")."""

    name: str = "toy"
    """Free-form name of the preset, recorded in the run."""
    layers: int = 4
    """Number of transformer layers N."""
    hidden: int = 128
    """Hidden size d."""
    heads: int = 2
    """Attention heads h; must divide hidden."""
    ffn_hidden: int | None = None
    """GeGLU inner size; None means round(8/3 * hidden) rounded up to a multiple of 64."""
    vocab_size: int | None = None
    """Padded vocabulary size; None means taken from the tokenizer, padded to pad_vocab_multiple."""
    pad_vocab_multiple: int = 128
    """Pad the vocabulary to a multiple of this so tensor-parallel ranks get equal slices."""
    seq_length: int = 128
    """Training sequence length (Part A + Part B)."""
    dropout: float = 0.0
    """Dropout on hidden states (after attention and FFN)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    layernorm_eps: float = 1e-5
    """LayerNorm epsilon."""
    deepnorm: DeepNormVariant = DeepNormVariant.glm130b
    """DeepNorm constants: GLM-130B's (default) or the DeepNet decoder recipe."""
    position_encoding: PositionEncoding = PositionEncoding.rope_1d
    """1D RoPE (GLM-130B) or GLM's 2D positions."""
    rope_base: float = 10000.0
    """RoPE base frequency."""
    attention_impl: AttentionImpl = AttentionImpl.auto
    """Attention kernel: sdpa (one call with the boolean prefix mask), split (two mask-free calls
    that FlashAttention kernels accept; for GPUs), blocks (CPU: per sample, only the keys each block
    of queries can see; fastest there, FP32 and bf16), auto (split on a GPU, blocks elsewhere) or eager
    (explicit FP32 softmax with query-key layer scaling, the reference). Decoding with a KV cache
    always uses the mask."""
    init_std: float = 0.02
    """Std of the normal init of the (tied) word embedding."""

    def ffn_size(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return int(math.ceil(8 * self.hidden / 3 / 64) * 64)


@dataclass
class ObjectiveConfig:
    """Autoregressive blank infilling (SPEC.md, "Objective")."""

    mask_prob: float = 0.3
    """Share of sequences corrupted with [MASK] spans; the rest use [gMASK]."""
    mask_ratio: float = 0.15
    """Share of tokens masked in a [MASK] sequence."""
    poisson_lambda: float = 3.0
    """Mean span length of [MASK] spans (Poisson)."""
    min_gmask_ratio: float = 0.2
    """Smallest share of a [gMASK] sequence that goes to Part B; the share is uniform in [this, 1)."""
    short_seq_prob: float = 0.02
    """Probability that a sample uses a shorter document window (uniform length)."""
    single_span_prob: float = 0.02
    """Probability that a [MASK] sample masks one single span of mask_ratio length."""


class OptimizerImpl(str, enum.Enum):
    auto = "auto"  # fused on CUDA; on CPU torch's own choice, the per-parameter loop
    fused = "fused"  # torch's fused AdamW kernel (CPU and GPU)
    foreach = "foreach"  # multi-tensor ops over all parameters at once
    for_loop = "for_loop"  # one parameter at a time (torch's reference implementation)


class SourceKind(str, enum.Enum):
    lm = "lm"  # documents for blank infilling ([MASK]/[gMASK] per the objective)
    mip = "mip"  # prompted samples: prompt in Part A, answer in Part B (glm-build-mip output)


@dataclass
class SourceConfig:
    """One training source of the blend."""

    path: str = "???"
    """Prefix of an indexed dataset (``.bin``/``.idx``/``.json``; MIP sets also ``.mip.npy``)."""
    weight: float | None = None
    """Share of the samples (normalized over sources); None for every source means by size."""
    kind: SourceKind = SourceKind.lm
    """lm (blank infilling over documents) or mip (prompt/answer samples)."""


@dataclass
class DataConfig:
    """Where training and validation tokens come from."""

    tokenizer: str = "data/demo/tokenizer.model"
    """Sentencepiece model file; special tokens are appended after its vocabulary."""
    sources: list[SourceConfig] = field(default_factory=lambda: [
        SourceConfig(path="data/demo/en_train"), SourceConfig(path="data/demo/zh_train")])
    """The training blend, e.g. data.sources=[{path:data/en,weight:0.95},{path:data/mip,weight:0.05,kind:mip}]."""
    valid: dict[str, str] = field(
        default_factory=lambda: {"en": "data/demo/en_val", "zh": "data/demo/zh_val"}
    )
    """Validation sets by name; metrics get ``val_loss_<name>``."""
    index_cache: str | None = None
    """Folder for the cached sample index (one file per epoch, built by one rank, memory-mapped by all);
    None means ``.glm_index/`` beside the first source."""
    allow_change: bool = False
    """Resume even if the data config (sources, weights, sizes, tokenizer, seed) differs from the checkpoint's."""


@dataclass
class RampupConfig:
    """Global batch ramp-up: start, then +increment every samples/((global_batch-start)/increment)
    consumed samples, until train.global_batch; the micro-batch size stays fixed."""

    start: int | None = None
    """Global batch at the first step (a multiple of micro_batch * dp); None: no ramp-up."""
    increment: int = 16
    """Batch growth per increment (a multiple of micro_batch * dp dividing global_batch - start)."""
    samples: int = 1000
    """Consumed samples over which the batch grows from start to train.global_batch."""


@dataclass
class TrainConfig:
    """Optimization loop (SPEC.md, "Training recipe")."""

    iters: int = 200
    """Optimizer steps to run in total (a resumed run continues up to this number)."""
    seed: int = 1234
    """Seed of the initialization, the data order and dropout."""
    micro_batch: int = 8
    """Sequences per micro-batch per data-parallel rank."""
    global_batch: int = 8
    """Sequences per optimizer step over all ranks (micro_batch * dp * grad-accumulation)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of cosine decay."""
    warmup_iters: int = 20
    """Linear warm-up steps, from warmup_init_lr to lr."""
    warmup_init_lr: float = 1e-7
    """Learning rate at step 0."""
    decay_iters: int | None = None
    """Steps of cosine decay after warm-up; None means until train.iters."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases and LayerNorm parameters, as in Megatron)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables."""
    max_seconds: float | None = None
    """Stop (with a checkpoint) after this many seconds of training steps in this process (evaluation
    and checkpointing not counted); None means no limit."""
    exit_at_step: int | None = None
    """Stop (with a checkpoint) after this step, as an interruption would; schedules still target iters."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    warmup_samples: int | None = None
    """LR warm-up in samples (SPEC: the schedule counts samples); set with decay_samples to make the LR a
    function of consumed samples instead of steps (warmup_iters/decay_iters are then ignored)."""
    decay_samples: int | None = None
    """Samples of cosine decay after warm-up (samples schedule); None means until the run's last sample."""
    optimizer_impl: OptimizerImpl = OptimizerImpl.auto
    """AdamW kernel: auto (fused on CUDA, for_loop on CPU), fused (one kernel pass
    over every parameter: 7x faster than for_loop on CPU), foreach or for_loop. They agree to rounding.
    Not fused by default: torch 2.13's fused CPU kernel is not bitwise reproducible here. The ramp-up
    stop-and-resume run (tests/test_stability.py) with fused differed from the uninterrupted one by
    one ulp of the loss in 1 of 4 repetitions (and once in CI). The same one-ulp drift was later seen
    with the default loop too, fresh uninterrupted runs included (docs/reproducibility.md), so fused
    may well not be its cause; the default stays until that is settled."""
    compile: bool = False
    """torch.compile every transformer block (inductor; on CPU it needs a C++ compiler). The first step
    pays the compilation (tens of seconds); later steps fuse the element-wise work (RoPE, GeGLU,
    LayerNorm, residuals): glm-1b on one H200, +11% tokens/s. In bf16 at TP = 1 the fused head's
    softmax and gradient per chunk (train.head_chunk) run compiled too: 0.82 of the eager chunks' time
    on CPU (benchmarks/head_loss.py). Results agree with eager to rounding.
    Resumes are exact on CPU; on a GPU two compiled runs of the same seed already differ by up to
    5e-5 in the loss (eager: bitwise), and a resumed run stays within that (tests/test_gpu.py)."""
    grad_accum_fp32: bool = True
    """bf16/fp16: sum the micro-batches' gradients in FP32 (train/grad_accum.py). The FP32 sums replace
    the 2-byte gradients: 2 bytes more per parameter per GPU (glm-plan counts it). GLM-130B summed in
    fp16 (configs/glm-130b-3d.yaml keeps that)."""
    head_chunk: int | None = None
    """Scored tokens per chunk of the fused output head + cross-entropy (train/loss.py). Each chunk's
    logits are made, turned into its loss and its gradients in the forward pass, and freed, so the
    head holds its input's and weight's gradients at the backward peak instead of about 12 bytes per
    logit (glm-1b, micro-batch 24, by glm-plan: 14.1 -> 1.9 GiB at the head's peak), and it is faster:
    one pass less over the logits (CPU, 2048 x 8192 logits: 0.84-0.88 of the whole head's time,
    benchmarks/head_loss.py). None: 4096 (0 under fp16);
    0: all logits at once, kept with their softmax for backward, the only choice under fp16 (its loss
    scale must be inside the logits' gradient, which the fused form makes before the scale is known)."""
    rampup: RampupConfig = field(default_factory=RampupConfig)
    """Batch-size ramp-up as Megatron's --rampup-batch-size (off unless rampup.start is set)."""


@dataclass
class EvalConfig:
    """Validation on [gMASK] samples of held-out documents."""

    every: int = 100
    """Evaluate every this many steps (and at the first and last step); 0 disables."""
    max_samples: int = 256
    """Validation sequences per set at most."""
    gmask_ratio: float = 0.5
    """Share of each validation window that goes to Part B (fixed, so the measure is stable)."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    every: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    load: str | None = None
    """Explicit checkpoint folder to resume from; None means ``<run.dir>/checkpoints/latest``."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (milestones); 0: none."""


SELECTIVE_RECOMPUTE = ("attention", "geglu")
"""Block parts that ``parallel.selective_recompute`` may name."""


@dataclass
class ParallelConfig:
    """Parallel layout (one process until the 3D-parallelism work lands)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    zero_stage: int = 1
    """ZeRO stage (0 or 1; 2/3 are refused by DeepSpeed's pipeline engine)."""
    zero_bucket_elements: int | None = None
    """Elements of one ZeRO gradient-reduction bucket (DeepSpeed's reduce_bucket_size). None: DeepSpeed's
    5e8, capped at this rank's parameter count. DeepSpeed allocates its buckets at full size every step
    (two at a time), so the uncapped default costs a 30M-parameter model 2 x 5e8 elements; a bucket
    that holds every gradient reduces them in one piece either way. Smaller buckets start reductions
    earlier on GPUs at the price of more, smaller messages."""
    activation_checkpoint_interval: int = 0
    """Recompute every this many transformer layers; 0 disables."""
    selective_recompute: list[str] = field(default_factory=list)
    """Parts of every block rebuilt in backward instead of stored, at a few percent of the compute of
    whole-layer recomputation: "attention" (RoPE + attention kernel: keeps q, k, v, drops the rotated
    copies, the kernel's saved output and, on the eager path, the S x S scores) and "geglu" (keeps
    the projection output, drops gelu(gate)). Empty: store everything."""
    partition: str = "glm"
    """Pipeline stage partitioning: glm (blocks spread evenly with the embedding and the head each
    counted as one block, so the first and last stages hold one block fewer, as GLM-130B's 70 = 9x8-2),
    uniform, parameters, or type:REGEX (DeepSpeed's methods)."""
    sequence_parallel: bool = False
    """Megatron-style sequence parallelism of LayerNorm/dropout regions (not implemented yet)."""


@dataclass
class LossScaleConfig:
    """fp16 dynamic loss scaling (SPEC defaults; DeepSpeed's dynamic loss scaler)."""

    initial_scale_power: int = 16
    """The first loss scale is 2**initial_scale_power."""
    loss_scale_window: int = 2000
    """Steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """Overflows tolerated before the scale is lowered."""
    min_loss_scale: float = 1.0
    """The scale never drops below this."""


@dataclass
class GuardConfig:
    """Loss-spike guard: skip suspicious updates, roll back after repeated spikes (docs/stability.md)."""

    enabled: bool = True
    """Check every step; a clean run never triggers it."""
    window: int = 50
    """Recent accepted steps whose loss and gradient norm form the reference."""
    min_history: int = 20
    """Accepted steps needed before any spike is declared (early training changes fast)."""
    loss_z: float = 6.0
    """A loss is a spike when it exceeds the median of the last 5 accepted losses by loss_z noise
    deviations (robust: 1.4826 x the median absolute deviation of step-to-step changes / sqrt 2) ..."""
    loss_rel: float = 0.1
    """... and by at least this fraction of that median."""
    grad_z: float = 6.0
    """Same test on the gradient norm, with grad_z ..."""
    grad_rel: float = 4.0
    """... and at least this fraction of the median (4.0: above 5x the recent norm; gradient clipping
    already bounds the update, so only extreme norms count)."""
    start_step: int | None = None
    """Steps up to this one are never called spikes (non-finite values always are): early training
    is legitimately erratic. None: the end of the LR warm-up."""
    rollback_after: int = 3
    """Spikes within rollback_window steps that trigger a rollback to the last good checkpoint; 0 never."""
    rollback_window: int = 20
    """Steps over which spikes are counted for a rollback."""
    max_rollbacks: int = 5
    """After this many rollbacks in one process the run stops with an error instead of looping."""
    lr_factor: float = 1.0
    """Multiply the learning rate by this after each rollback (1.0 keeps it)."""
    egs_alpha: float | None = None
    """Embedding gradient shrink alpha to use after a rollback; None keeps the schedule."""


@dataclass
class StabilityConfig:
    """Training-stability measures."""

    egs: Any = 0.1
    """Embedding gradient shrink alpha: a number, or a list of [step, alpha] points (linear between)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Loss-spike guard."""
    z_loss: float = 0.0
    """Weight of the z-loss (mean squared log-partition of the scored tokens' logits); 0 disables."""


@dataclass
class DebugConfig:
    """Fault injection for tests and drills."""

    corrupt_steps: list[int] | None = None
    """[a, b]: the samples that steps a..b (1-based, as logged) would read are replaced by random tokens
    wherever they are read, so a rollback that replays them meets the same corruption."""
    huge_grad_steps: list[int] | None = None
    """Steps (1-based) whose gradients are multiplied by 1e30 (the loss value unchanged): an fp16
    overflow, or a non-finite gradient norm in fp32/bf16."""


@dataclass
class RunConfig:
    """Run directory and logging."""

    dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, loss.png."""
    log_every: int = 1
    """Write a metrics line every this many steps."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless wandb_mode says otherwise)."""
    wandb_mode: str = "offline"
    """wandb mode: offline (default, needs no account or network), online or disabled."""
    wandb_project: str = "glm_train"
    timers: bool = False
    """Record each step's time per pipeline instruction in metrics.jsonl (time_forward_s, time_backward_s,
    time_optimizer_s, time_recv_activation_s, ...; glm_train/train/timers.py), this rank's. On a GPU the
    device is synchronized around every instruction, which costs a little throughput."""


@dataclass
class HardwareConfig:
    """What the accelerator can do, for MFU figures."""

    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device in the run's precision (e.g. 989 for an H100 SXM in bf16; `glm-bench
    peak` measures a large matmul); None: metrics.jsonl carries FLOP/s but no MFU."""


@dataclass
class GLMConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    fp16: LossScaleConfig = field(default_factory=LossScaleConfig)
    """Loss scaling, used when precision=fp16."""
    precision: Precision = Precision.fp32
    """Training precision: fp32, bf16 or fp16 (FP32 master weights, optimizer state, softmax and loss in
    every case; fp16 adds dynamic loss scaling, see the fp16 section)."""


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="glm_schema", node=GLMConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


def load_config(overrides: list[str] | None = None, config_name: str = "config",
                check_paths: bool = True) -> GLMConfig:
    """Compose ``configs/<config_name>.yaml`` with Hydra overrides, convert and validate.

    Raises ConfigError with the offending key named in the message.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=list(overrides or []))
        _check_unknown_keys(OmegaConf.to_container(cfg, resolve=True), GLMConfig, "")
        obj = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_clean_hydra_message(e)) from None
    assert isinstance(obj, GLMConfig)
    validate(obj, check_paths=check_paths)
    return obj


def _check_unknown_keys(node: Any, schema: type, prefix: str) -> None:
    """Hydra lets ``+key=value`` add keys to a typed node; refuse any key the dataclass lacks."""
    import dataclasses

    if not isinstance(node, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, val in node.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{full}: unknown key; allowed keys under '{prefix.rstrip('.') or '<root>'}' are "
                              f"{', '.join(sorted(fields))}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            _check_unknown_keys(val, sub, full + ".")


def _clean_hydra_message(e: BaseException) -> str:
    # Hydra wraps OmegaConf's error (which names the key and the allowed values) as __cause__.
    parts: list[str] = []
    cur: BaseException | None = e
    while cur is not None:
        lines = [ln.strip() for ln in str(cur).splitlines()]
        # Drop OmegaConf's "object_type=..." noise and Hydra's search-path dump.
        lines = [ln for ln in lines if ln and not ln.startswith(("object_type", "Config search path", "provider="))]
        text = " ".join(lines)
        if text and text not in parts and "$VALUE" not in text:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return " | ".join(parts)


def to_yaml(cfg: GLMConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(path: str | Path) -> GLMConfig:
    """Read a run's saved config.yaml back into a GLMConfig (no validation of data paths)."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(GLMConfig)
    obj = OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(path)))
    assert isinstance(obj, GLMConfig)
    return obj


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def egs_points(egs: Any) -> list[tuple[int, float]]:
    """Normalize ``stability.egs`` to sorted (step, alpha) points; raises ConfigError."""
    if isinstance(egs, (int, float)) and not isinstance(egs, bool):
        pts = [(0, float(egs))]
    elif isinstance(egs, (list, tuple)) and egs:
        pts = []
        for p in egs:
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise ConfigError(f"stability.egs: expected a number or a list of [step, alpha] pairs, got {egs!r}")
            pts.append((int(p[0]), float(p[1])))
        pts.sort()
    else:
        raise ConfigError(f"stability.egs: expected a number or a list of [step, alpha] pairs, got {egs!r}")
    for _, a in pts:
        _require(0.0 <= a <= 1.0, "stability.egs", f"alpha must lie in [0, 1], got {a}")
    return pts


def _validate_schedule(cfg: GLMConfig, dp: int) -> None:
    t = cfg.train
    for key, val in [("train.warmup_samples", t.warmup_samples), ("train.decay_samples", t.decay_samples)]:
        _require(val is None or val >= 0, key, f"must be >= 0 or null, got {val}")
    _require(t.decay_samples is None or t.warmup_samples is not None, "train.warmup_samples",
             "set it too when train.decay_samples is set (the schedule is in samples or in steps, not both)")
    r = t.rampup
    if r.start is None:
        return
    unit = t.micro_batch * dp
    _require(r.start >= unit and r.start % unit == 0, "train.rampup.start",
             f"must be a positive multiple of micro_batch*dp={unit}, got {r.start}")
    _require(r.start < t.global_batch, "train.rampup.start",
             f"must be smaller than train.global_batch={t.global_batch}, got {r.start}")
    _require(r.increment >= unit and r.increment % unit == 0, "train.rampup.increment",
             f"must be a positive multiple of micro_batch*dp={unit}, got {r.increment}")
    _require((t.global_batch - r.start) % r.increment == 0, "train.rampup.increment",
             f"must divide global_batch-start={t.global_batch - r.start}, got {r.increment}")
    _require(r.samples > 0, "train.rampup.samples", f"must be > 0, got {r.samples}")


def _validate_stability(cfg: GLMConfig) -> None:
    g = cfg.stability.guard
    _require(g.window >= 3, "stability.guard.window", f"must be >= 3, got {g.window}")
    _require(3 <= g.min_history <= g.window, "stability.guard.min_history",
             f"must lie in [3, stability.guard.window={g.window}], got {g.min_history}")
    for key, val in [("loss_z", g.loss_z), ("loss_rel", g.loss_rel), ("grad_z", g.grad_z),
                     ("grad_rel", g.grad_rel)]:
        _require(val > 0, f"stability.guard.{key}", f"must be > 0, got {val}")
    _require(g.rollback_after >= 0, "stability.guard.rollback_after", "must be >= 0 (0: never roll back)")
    _require(g.rollback_window >= 1, "stability.guard.rollback_window", "must be >= 1")
    _require(g.max_rollbacks >= 0, "stability.guard.max_rollbacks", "must be >= 0")
    _require(0 < g.lr_factor <= 1, "stability.guard.lr_factor", f"must lie in (0, 1], got {g.lr_factor}")
    _require(g.egs_alpha is None or 0 <= g.egs_alpha <= 1, "stability.guard.egs_alpha",
             f"must lie in [0, 1] or be null, got {g.egs_alpha}")
    _require(cfg.stability.z_loss >= 0, "stability.z_loss", f"must be >= 0, got {cfg.stability.z_loss}")
    c = cfg.debug.corrupt_steps
    if c is not None:
        _require(len(c) == 2 and 1 <= c[0] <= c[1], "debug.corrupt_steps",
                 f"expected [a, b] with 1 <= a <= b, got {list(c)}")
    _require(cfg.hardware.peak_tflops is None or cfg.hardware.peak_tflops > 0, "hardware.peak_tflops",
             f"must be > 0 or null, got {cfg.hardware.peak_tflops}")
    h = cfg.debug.huge_grad_steps
    _require(h is None or all(x >= 1 for x in h), "debug.huge_grad_steps", f"steps are >= 1, got {h}")
    f = cfg.fp16
    _require(f.initial_scale_power >= 0, "fp16.initial_scale_power", "must be >= 0")
    _require(f.loss_scale_window >= 1, "fp16.loss_scale_window", "must be >= 1")
    _require(f.hysteresis >= 1, "fp16.hysteresis", "must be >= 1")
    _require(f.min_loss_scale > 0, "fp16.min_loss_scale", "must be > 0")


HEAD_CHUNK = 4096
"""train.head_chunk's default: 4096 x V/tp FP32 logits at a time (glm-1b: 0.8 GB)."""


def head_chunk(cfg: GLMConfig) -> int:
    """train.head_chunk resolved: scored tokens per fused head chunk, 0 for the unfused head."""
    if cfg.train.head_chunk is not None:
        return cfg.train.head_chunk
    return 0 if cfg.precision == Precision.fp16 else HEAD_CHUNK


def validate(cfg: GLMConfig, check_paths: bool = True) -> None:
    """Cross-field checks that OmegaConf's typing cannot express. Cheap: no torch, no I/O but stat."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    for key, val in [("model.layers", m.layers), ("model.hidden", m.hidden), ("model.heads", m.heads),
                     ("model.seq_length", m.seq_length), ("train.micro_batch", t.micro_batch),
                     ("train.global_batch", t.global_batch), ("parallel.tp", p.tp), ("parallel.pp", p.pp)]:
        _require(val >= 1, key, f"must be >= 1, got {val}")
    _require(t.iters >= 0, "train.iters", f"must be >= 0, got {t.iters}")
    if t.head_chunk is not None:
        _require(t.head_chunk >= 0, "train.head_chunk", f"must be >= 0 or null, got {t.head_chunk}")
        _require(t.head_chunk == 0 or cfg.precision != Precision.fp16, "train.head_chunk",
                 f"must be 0 or null with precision=fp16 (the fused head has no loss scale), got {t.head_chunk}")
    _require(m.hidden % m.heads == 0, "model.heads",
             f"must divide model.hidden={m.hidden}, got {m.heads}")
    head_dim = m.hidden // m.heads
    _require(head_dim % 2 == 0, "model.heads", f"head dim hidden/heads={head_dim} must be even for RoPE")
    if m.position_encoding == PositionEncoding.rope_2d:
        _require(head_dim % 4 == 0, "model.position_encoding",
                 f"rope_2d needs a head dim divisible by 4, got {head_dim}")
    _require(m.ffn_size() >= 1, "model.ffn_hidden", f"must be >= 1, got {m.ffn_hidden}")
    _require(m.pad_vocab_multiple >= 1, "model.pad_vocab_multiple", "must be >= 1")
    for key, val in [("model.dropout", m.dropout), ("model.attention_dropout", m.attention_dropout)]:
        _require(0.0 <= val < 1.0, key, f"must lie in [0, 1), got {val}")
    _require(m.heads % p.tp == 0, "parallel.tp", f"must divide model.heads={m.heads}, got {p.tp}")
    _require(m.ffn_size() % p.tp == 0, "parallel.tp", f"must divide the FFN size {m.ffn_size()}, got {p.tp}")
    if m.vocab_size is not None:
        _require(m.vocab_size % p.tp == 0, "model.vocab_size", f"must be divisible by parallel.tp={p.tp}")
    _require(m.pad_vocab_multiple % p.tp == 0, "model.pad_vocab_multiple",
             f"must be divisible by parallel.tp={p.tp}, got {m.pad_vocab_multiple}")
    _require(p.pp <= m.layers, "parallel.pp", f"must be <= model.layers={m.layers}, got {p.pp}")
    _require(p.partition in ("glm", "uniform", "parameters") or p.partition.startswith("type:"),
             "parallel.partition", f"allowed values are glm, uniform, parameters, type:REGEX; got {p.partition}")
    for part in p.selective_recompute:
        _require(part in SELECTIVE_RECOMPUTE, "parallel.selective_recompute",
                 f"allowed values are {', '.join(SELECTIVE_RECOMPUTE)}; got {part!r}")
    _require(not p.sequence_parallel, "parallel.sequence_parallel", "allowed value is false (not implemented yet)")
    _require(p.zero_stage in (0, 1), "parallel.zero_stage",
             f"allowed values are 0 or 1 (DeepSpeed refuses ZeRO-2/3 with pipelines), got {p.zero_stage}")
    _require(p.zero_bucket_elements is None or p.zero_bucket_elements > 0, "parallel.zero_bucket_elements",
             f"must be a positive element count or null, got {p.zero_bucket_elements}")
    _require(t.global_batch % t.micro_batch == 0, "train.global_batch",
             f"must be a multiple of train.micro_batch={t.micro_batch}, got {t.global_batch}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _require(world % (p.tp * p.pp) == 0, "parallel.tp",
             f"tp*pp={p.tp * p.pp} must divide the world size {world}")
    dp = world // (p.tp * p.pp)
    _require(t.global_batch % (t.micro_batch * dp) == 0, "train.global_batch",
             f"must be a multiple of train.micro_batch*dp={t.micro_batch * dp}, got {t.global_batch}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", f"must lie in [0, train.lr], got {t.min_lr}")
    _require(t.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
    o = cfg.objective
    for key, val in [("objective.mask_prob", o.mask_prob), ("objective.short_seq_prob", o.short_seq_prob),
                     ("objective.single_span_prob", o.single_span_prob)]:
        _require(0.0 <= val <= 1.0, key, f"must lie in [0, 1], got {val}")
    _require(0.0 < o.mask_ratio < 1.0, "objective.mask_ratio", f"must lie in (0, 1), got {o.mask_ratio}")
    _require(0.0 < o.min_gmask_ratio < 1.0, "objective.min_gmask_ratio", "must lie in (0, 1)")
    _require(o.poisson_lambda > 0, "objective.poisson_lambda", "must be > 0")
    _require(0.0 < cfg.eval.gmask_ratio < 1.0, "eval.gmask_ratio", "must lie in (0, 1)")
    # DeepSpeed's bf16 optimizer without ZeRO writes checkpoints it cannot read back (KeyError in
    # its legacy loader): refuse a run that could not be resumed.
    _require(not (cfg.precision == Precision.bf16 and p.zero_stage == 0), "parallel.zero_stage",
             "precision=bf16 needs parallel.zero_stage=1 (DeepSpeed's bf16 optimizer without ZeRO cannot "
             "load its own checkpoints)")
    _require(not (cfg.precision == Precision.fp16 and p.zero_stage == 0), "parallel.zero_stage",
             "precision=fp16 needs parallel.zero_stage=1 (DeepSpeed's pipeline fp16 optimizer without ZeRO "
             "never scales the loss)")
    egs_points(cfg.stability.egs)
    _validate_schedule(cfg, dp)
    _validate_stability(cfg)
    _require(cfg.run.wandb_mode in ("offline", "online", "disabled"), "run.wandb_mode",
             f"allowed values are offline, online, disabled; got {cfg.run.wandb_mode}")
    d = cfg.data
    _require(len(d.sources) >= 1, "data.sources", "needs at least one source")
    weights = [src.weight for src in d.sources]
    if any(w is not None for w in weights):
        _require(all(w is not None for w in weights), "data.sources",
                 "give a weight to every source, or to none (then sources are weighted by size)")
        _require(all(w >= 0 for w in weights) and sum(weights) > 0, "data.sources",
                 "weights must be non-negative with a positive sum")
    for i, src in enumerate(d.sources):
        _require(src.path not in ("", "???"), f"data.sources[{i}].path", "is required")
    if check_paths:
        _require(Path(d.tokenizer).is_file(), "data.tokenizer",
                 f"file not found: {d.tokenizer} (run `glm-prepare-demo` for the demo data)")
        for i, src in enumerate(d.sources):
            prefix = src.path
            _require(Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file(), f"data.sources[{i}].path",
                     f"dataset not found: {prefix}.bin/.idx (run `glm-prepare-demo` for the demo data)")
            if src.kind == SourceKind.mip:
                _require(Path(prefix + ".mip.npy").is_file(), f"data.sources[{i}].kind",
                         f"kind=mip needs {prefix}.mip.npy (made by glm-build-mip)")
        for name, prefix in d.valid.items():
            _require(Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file(), f"data.valid.{name}",
                     f"dataset not found: {prefix}.bin/.idx")
