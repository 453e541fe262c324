"""Step-indexed schedules: learning rate (warm-up + cosine) and the EGS alpha."""

from __future__ import annotations

import math

from glm_train.config import TrainConfig, egs_points


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from warmup_init_lr to lr, then cosine decay to min_lr, then flat."""
    if step < cfg.warmup_iters:
        return cfg.warmup_init_lr + (cfg.lr - cfg.warmup_init_lr) * step / cfg.warmup_iters
    decay = cfg.decay_iters if cfg.decay_iters is not None else max(1, cfg.iters - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, decay))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


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
