"""Build the DeepSpeed pipeline engine for a GLM config (one stage at pp=1)."""

from __future__ import annotations

import os
from typing import Any

import deepspeed
import torch
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch.optim.lr_scheduler import LambdaLR

from glm_train.config import GLMConfig, Precision
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


def build_engine(cfg: GLMConfig, backend: str) -> deepspeed.PipelineEngine:
    """Initialize the process group, build the pipeline module, optimizer, LR schedule and engine."""
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    dp = data_parallel_size(cfg)
    topo = PipeModelDataParallelTopology(num_pp=cfg.parallel.pp, num_mp=cfg.parallel.tp, num_dp=dp)
    module = glm_pipeline(cfg.model, cfg.train.seed, topo,
                          activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval)
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(0, t)

    def scheduler(opt: torch.optim.Optimizer) -> LambdaLR:
        # LambdaLR multiplies each group's initial lr; normalizing by it makes lr_at() absolute.
        return LambdaLR(opt, lambda step: lr_at(step, t) / t.lr)

    for g in optimizer.param_groups:
        g["initial_lr"] = t.lr
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg))
    return engine
