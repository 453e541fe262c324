"""Build the DeepSpeed pipeline engine for a GLM config (one stage at pp=1)."""

from __future__ import annotations

import math
import os
from typing import Any

import deepspeed
import torch

from glm_train.config import GLMConfig, OptimizerImpl, Precision, head_chunk
from glm_train.parallel.grad_norm import clip_grad_norm
from glm_train.parallel.random import TP_RANDOM
from glm_train.parallel.topology import ParallelState
from glm_train.train.grad_accum import install_fp32_grad_accumulation
from glm_train.train.pipeline import BlockPipe, glm_pipeline
from glm_train.train.plan import zero_bucket_elements


def data_parallel_size(cfg: GLMConfig) -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) // (cfg.parallel.tp * cfg.parallel.pp)


def _owns_clipping(cfg: GLMConfig) -> bool:
    return cfg.parallel.zero_stage == 0 and cfg.precision == Precision.fp32


def deepspeed_config(cfg: GLMConfig, local_params: int) -> dict[str, Any]:
    """DeepSpeed's config dict; ``local_params`` (this rank's parameter count) sizes ZeRO's buckets."""
    t = cfg.train
    dp = data_parallel_size(cfg)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * dp),
        # fp32 without ZeRO uses our own clipping, which DeepSpeed only calls when clipping is on: a
        # huge threshold keeps it called (the spike guard needs every step's norm) without clipping.
        "gradient_clipping": t.clip_grad if t.clip_grad > 0 or not _owns_clipping(cfg) else 1e30,
        "zero_optimization": {"stage": cfg.parallel.zero_stage,
                              "reduce_bucket_size": zero_bucket_elements(local_params, cfg.parallel.zero_bucket_elements)},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == Precision.bf16},
        # Not DeepSpeed's own FP32 accumulation (wrong under pp > 1): train/grad_accum.py does it.
        "data_types": {"grad_accum_dtype": None},
        "fp16": {
            "enabled": cfg.precision == Precision.fp16,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.fp16.initial_scale_power,
            "loss_scale_window": cfg.fp16.loss_scale_window,
            "hysteresis": cfg.fp16.hysteresis,
            "min_loss_scale": cfg.fp16.min_loss_scale,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Megatron's split: no weight decay on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "layernorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: GLMConfig, backend: str) -> tuple[deepspeed.PipelineEngine, ParallelState]:
    """Initialize the process groups, build the pipeline module, optimizer, LR schedule and engine."""
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    par = ParallelState(cfg.parallel.tp, cfg.parallel.pp, data_parallel_size(cfg))
    TP_RANDOM.seed(cfg.train.seed, par.get_pipeline_model_parallel_rank(), par.get_tensor_model_parallel_rank(),
                   par.get_tensor_model_parallel_world_size())
    module = glm_pipeline(cfg.model, cfg.train.seed, par.topology, partition=cfg.parallel.partition,
                          activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval,
                          selective_recompute=frozenset(cfg.parallel.selective_recompute))
    if getattr(module, "loss_fn", None) is not None:  # the last pipeline stage
        module.loss_fn.head_chunk = head_chunk(cfg)
        module.loss_fn.z_loss = cfg.stability.z_loss
        module.loss_fn.compiled = cfg.train.compile
    t = cfg.train
    if t.compile:
        compile_blocks(module)
    impl = OptimizerImpl(t.optimizer_impl)
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                  fused=True if fused_adamw(impl) else None,
                                  foreach={OptimizerImpl.foreach: True, OptimizerImpl.for_loop: False}.get(impl))
    if cfg.precision == Precision.fp16:
        _allow_cpu_fp16()
    # No DeepSpeed LR scheduler: the trainer sets the LR before each step from (step, consumed samples),
    # so skipped steps, ramp-up and rollbacks cannot shift the schedule.
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=deepspeed_config(
        cfg, sum(p.numel() for p in module.parameters())))
    if cfg.precision != Precision.fp32 and t.grad_accum_fp32:
        # Micro-batch gradients are summed in FP32, not in the model's 8/11-bit mantissa.
        engine.fp32_grad_accumulator = install_fp32_grad_accumulation(engine)
    if _owns_clipping(cfg):
        _own_fp32_clipping(engine, par, t.clip_grad if t.clip_grad > 0 else math.inf)
    return engine, par


def fused_adamw(impl: OptimizerImpl) -> bool:
    """Whether ``train.optimizer_impl`` means torch's fused AdamW here. auto: fused on a GPU (one kernel
    pass over the FP32 master: glm-1b on one H200, 2.5% more tokens/s than torch's foreach default),
    torch's own choice elsewhere (the CPU note in config.py)."""
    return impl == OptimizerImpl.fused or (impl == OptimizerImpl.auto and torch.cuda.is_available())


def compile_blocks(module: torch.nn.Module) -> None:
    """torch.compile each transformer block in place.

    Blocks, not the pipeline module: DeepSpeed's schedule, communication and activation
    checkpointing stay in eager code, and the blocks are identical, so one compiled graph serves all.
    """
    for layer in module.modules():
        if isinstance(layer, BlockPipe):
            layer.compile()


def _own_fp32_clipping(engine: deepspeed.PipelineEngine, par: ParallelState, max_norm: float) -> None:
    """Replace DeepSpeed's fp32 no-ZeRO clipping, which miscounts parameters across pipeline stages."""
    group = par.get_model_parallel_group()
    tp_rank = par.get_tensor_model_parallel_rank()

    def clip() -> None:
        engine._global_grad_norm = clip_grad_norm(engine.module.parameters(), max_norm, tp_rank, group)

    engine.clip_fp32_gradients = clip


def set_lr(engine: deepspeed.PipelineEngine, lr: float) -> None:
    """Set the LR of every parameter group (DeepSpeed's optimizer wrappers share the torch groups)."""
    for g in engine.optimizer.param_groups:
        g["lr"] = lr


def _allow_cpu_fp16() -> None:
    """DeepSpeed refuses fp16 when the CPU accelerator reports no fp16 support (a host-CPU property).

    Torch computes fp16 on any CPU (slowly, often via conversion), which is all a CPU test of the loss
    scaler needs; on GPUs the check passes by itself and nothing is changed.
    """
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        acc.is_fp16_supported = lambda: True  # type: ignore[method-assign]

