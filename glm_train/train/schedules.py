"""Schedules: learning rate (warm-up + cosine, in steps or samples), batch-size ramp-up, EGS alpha.

All are pure functions of the run's position (step, consumed samples), which a checkpoint stores: a
resumed or rolled-back run recomputes them instead of restoring scheduler objects.
"""

from __future__ import annotations

import math

from glm_train.config import TrainConfig, egs_points


def _warmup_cosine(pos: float, warmup: float, decay: float, cfg: TrainConfig) -> float:
    if pos < warmup:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * pos / warmup
    progress = min(1.0, (pos - warmup) / max(1.0, decay))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def uses_sample_schedule(cfg: TrainConfig) -> bool:
    """True when the LR schedule is given in samples (train.warmup_samples set)."""
    return cfg.warmup_samples is not None


def lr_at(step: int, cfg: TrainConfig, consumed_samples: int | None = None) -> float:
    """LR before the update of step ``step + 1``: linear warm-up from warmup_init_lr to lr, cosine decay
    to min_lr, then flat. In steps, or in consumed samples when train.warmup_samples is set."""
    if uses_sample_schedule(cfg):
        if consumed_samples is None:
            raise ValueError("the samples LR schedule needs consumed_samples")
        warmup = float(cfg.warmup_samples or 0)
        decay = cfg.decay_samples if cfg.decay_samples is not None else total_samples(cfg) - warmup
        return _warmup_cosine(float(consumed_samples), warmup, float(decay), cfg)
    decay_iters = cfg.decay_iters if cfg.decay_iters is not None else max(1, cfg.iters - cfg.warmup_iters)
    return _warmup_cosine(float(step), float(cfg.warmup_iters), float(decay_iters), cfg)


def global_batch_at(consumed_samples: int, cfg: TrainConfig) -> int:
    """Global batch of the step that starts after ``consumed_samples`` (Megatron's ramp-up rule)."""
    r = cfg.rampup
    if r.start is None:
        return cfg.global_batch
    increments = (cfg.global_batch - r.start) // r.increment
    per_increment = r.samples / increments
    return min(cfg.global_batch, r.start + int(consumed_samples / per_increment) * r.increment)


def total_samples(cfg: TrainConfig) -> int:
    """Samples consumed by train.iters steps under the ramp-up."""
    if cfg.rampup.start is None:
        return cfg.iters * cfg.global_batch
    consumed = 0
    for step in range(cfg.iters):
        b = global_batch_at(consumed, cfg)
        if b == cfg.global_batch:
            return consumed + (cfg.iters - step) * b
        consumed += b
    return consumed


def samples_before_step(step: int, cfg: TrainConfig) -> int:
    """Samples consumed before step ``step`` (1-based) in a run without skipped data."""
    consumed = 0
    for _ in range(step - 1):
        consumed += global_batch_at(consumed, cfg)
    return consumed


class EGSSchedule:
    """alpha by step: piecewise linear between (step, alpha) points, constant outside them."""

    def __init__(self, egs: object) -> None:
        self.points = egs_points(egs)

    def __call__(self, step: int) -> float:
        pts = self.points
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, a0), (s1, a1) in zip(pts, pts[1:]):
            if step <= s1:
                return a0 + (a1 - a0) * (step - s0) / max(1, s1 - s0)
        return pts[-1][1]
