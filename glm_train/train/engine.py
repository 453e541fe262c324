"""Build the DeepSpeed pipeline engine for a GLM config (one stage at pp=1)."""

from __future__ import annotations

import os
from typing import Any

import deepspeed
import torch
from torch.optim.lr_scheduler import LambdaLR

from glm_train.config import GLMConfig, Precision
from glm_train.parallel.grad_norm import clip_grad_norm
from glm_train.parallel.random import TP_RANDOM
from glm_train.parallel.topology import ParallelState
from glm_train.train.pipeline import glm_pipeline
from glm_train.train.schedules import lr_at


def data_parallel_size(cfg: GLMConfig) -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) // (cfg.parallel.tp * cfg.parallel.pp)


def deepspeed_config(cfg: GLMConfig) -> dict[str, Any]:
    t = cfg.train
    dp = data_parallel_size(cfg)
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * dp),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.precision == Precision.bf16},
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
    TP_RANDOM.seed(cfg.train.seed, par.get_pipeline_model_parallel_rank(), par.get_tensor_model_parallel_rank())
    module = glm_pipeline(cfg.model, cfg.train.seed, par.topology, partition=cfg.parallel.partition,
                          activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval)
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    for g in optimizer.param_groups:
        # LambdaLR multiplies each group's initial lr; normalizing by it makes lr_at() absolute.
        g["initial_lr"] = t.lr
        g["lr"] = lr_at(0, t)

    def scheduler(opt: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(opt, lambda step: lr_at(step, t) / t.lr)

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    if cfg.parallel.zero_stage == 0 and cfg.precision == Precision.fp32 and t.clip_grad > 0:
        _own_fp32_clipping(engine, par, t.clip_grad)
    return engine, par


def _own_fp32_clipping(engine: deepspeed.PipelineEngine, par: ParallelState, max_norm: float) -> None:
    """Replace DeepSpeed's fp32 no-ZeRO clipping, which miscounts parameters across pipeline stages."""
    group = par.get_model_parallel_group()
    tp_rank = par.get_tensor_model_parallel_rank()

    def clip() -> None:
        engine._global_grad_norm = clip_grad_norm(engine.module.parameters(), max_norm, tp_rank, group)

    engine.clip_fp32_gradients = clip
