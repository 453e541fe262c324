"""Loss-spike guard: decide, before each optimizer update, whether to apply it.

GLM-130B's late loss spikes were handled by hand: restart from an earlier checkpoint and skip the data
of the spike. This module does it unattended. Each step's loss and gradient norm are compared with
robust statistics (median, median absolute deviation) of the recent accepted steps; a spike's update
is skipped (its data counts as consumed), and repeated spikes ask the trainer for a rollback.
A spike is a loss (or gradient norm) above the median of the last few accepted steps by more than
``z`` noise deviations and by more than a fraction ``rel`` of that median.

The decision runs inside the optimizer step (``install_update_gate``) because DeepSpeed's pipeline
engine computes the loss, the gradient norm and the update in one ``train_batch`` call. At that point
every rank has finished its part of the batch: one all-reduce gives all ranks the batch loss and the
same decision.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from glm_train.config import GuardConfig

_MAD_TO_STD = 1.4826  # median absolute deviation -> standard deviation of a normal distribution
_RECENT = 5  # accepted steps whose median is the reference level (short: the loss keeps falling)


@dataclass
class Verdict:
    """The guard's decision for one step."""

    apply: bool
    reason: str = ""
    """Why the update was skipped: nonfinite, loss_spike, grad_spike (empty when applied)."""
    loss: float = math.nan
    grad_norm: float = math.nan
    loss_median: float = math.nan
    grad_median: float = math.nan
    rollback: bool = False
    """True when this spike completes rollback_after spikes within rollback_window steps."""


@dataclass
class SpikeGuard:
    """Rolling robust statistics of accepted steps and the spike log; its state goes into checkpoints."""

    cfg: GuardConfig
    losses: deque[float] = field(default_factory=deque)
    grad_norms: deque[float] = field(default_factory=deque)
    spike_steps: list[int] = field(default_factory=list)

    def _limit(self, values: deque[float], z: float, rel: float) -> tuple[float, float]:
        """(center, limit): the median of the last few values, plus z noise deviations or rel x center.

        The noise is estimated from step-to-step differences (1.4826 x their median absolute deviation,
        over sqrt(2)), which a falling trend does not inflate the way the spread of the values would.
        """
        vals = list(values)
        center = statistics.median(vals[-_RECENT:])
        diffs = [b - a for a, b in zip(vals, vals[1:])]
        dmed = statistics.median(diffs)
        noise = _MAD_TO_STD * statistics.median(abs(d - dmed) for d in diffs) / math.sqrt(2.0)
        return center, center + max(z * noise, rel * abs(center))

    def judge(self, step: int, loss: float, grad_norm: float, judging: bool = True) -> Verdict:
        """Decide for step ``step`` (1-based); updates the history and the spike log.

        ``judging=False`` (before stability.guard.start_step) only refuses non-finite values.
        """
        v = Verdict(apply=True, loss=loss, grad_norm=grad_norm)
        if not self.cfg.enabled:
            return v
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            v.apply, v.reason = False, "nonfinite"
        elif judging and len(self.losses) >= self.cfg.min_history:
            v.loss_median, loss_limit = self._limit(self.losses, self.cfg.loss_z, self.cfg.loss_rel)
            v.grad_median, grad_limit = self._limit(self.grad_norms, self.cfg.grad_z, self.cfg.grad_rel)
            if loss > loss_limit:
                v.apply, v.reason = False, "loss_spike"
            elif grad_norm > grad_limit:
                v.apply, v.reason = False, "grad_spike"
        if v.apply:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            while len(self.losses) > self.cfg.window:
                self.losses.popleft()
                self.grad_norms.popleft()
            return v
        self.spike_steps.append(step)
        recent = [s for s in self.spike_steps if s > step - self.cfg.rollback_window]
        v.rollback = self.cfg.rollback_after > 0 and len(recent) >= self.cfg.rollback_after
        return v

    def region_start(self, step: int) -> int:
        """First spike step of the rollback window ending at ``step``."""
        return min(s for s in self.spike_steps if s > step - self.cfg.rollback_window)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                "spike_steps": list(self.spike_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = deque(float(x) for x in state["losses"])
        self.grad_norms = deque(float(x) for x in state["grad_norms"])
        self.spike_steps = [int(s) for s in state["spike_steps"]]


def base_optimizer(opt: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16/FP16 optimizers)."""
    seen = 0
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
        seen += 1
        if seen > 4:
            raise TypeError("no torch optimizer found inside the DeepSpeed optimizer")
    return opt


class UpdateGate:
    """Wraps the base optimizer's ``step``: the first call of a training step asks ``decide`` once;
    a refused update skips every ``step`` call of that training step (ZeRO-1 calls it once per group).

    ``decide`` receives nothing and returns True to apply; the trainer arms the gate before each
    ``train_batch`` and reads ``called``/``applied`` after it (not called: DeepSpeed skipped the
    update itself, e.g. an fp16 overflow).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.decide: Callable[[], bool] | None = None
        self.called = False
        self.applied = True
        opt = base_optimizer(engine.optimizer)
        original = opt.step

        def gated_step(*args: Any, **kwargs: Any) -> Any:
            if not self.called:
                self.called = True
                self.applied = self.decide() if self.decide is not None else True
            if self.applied:
                return original(*args, **kwargs)
            return None

        opt.step = gated_step  # type: ignore[method-assign]

    def arm(self, decide: Callable[[], bool] | None) -> None:
        self.decide, self.called, self.applied = decide, False, True


def batch_loss_and_norm(engine: Any) -> tuple[float, float]:
    """Mean loss of the current batch and its gradient norm, identical on every rank.

    Called inside the optimizer step: the last pipeline stage holds the summed micro-batch losses
    (``engine.total_loss``); one all-reduce shares their mean and the largest reported norm.
    """
    total = getattr(engine, "total_loss", None)
    last = engine.is_last_stage() and total is not None
    loss_sum = float(total.detach().float()) / engine.micro_batches if last else 0.0
    norm = getattr(engine.optimizer, "_global_grad_norm", None)
    if norm is None:
        norm = getattr(engine, "_global_grad_norm", None)
    norm_val = float(norm) if norm is not None else math.nan
    if not math.isfinite(norm_val):
        norm_val = math.inf
    # NCCL reduces device tensors only; gloo host tensors.
    device = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    buf = torch.tensor([loss_sum, 1.0 if last else 0.0], dtype=torch.float64, device=device)
    nbuf = torch.tensor([norm_val], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buf)
        dist.all_reduce(nbuf, op=dist.ReduceOp.MAX)
    loss = float(buf[0] / buf[1]) if buf[1] > 0 else math.nan
    return loss, float(nbuf[0])
