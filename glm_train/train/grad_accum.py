"""FP32 gradient accumulation across micro-batches for bf16/fp16 models under DeepSpeed's pipeline.

DeepSpeed can accumulate in FP32 itself (``data_types.grad_accum_dtype=fp32``), but with pipeline
parallelism its accumulation loses micro-batches: on the tiny model at pp=2 the gradient norm came out
0.130 instead of 0.770 (bf16 and fp16 alike; measured with deepspeed 0.19.8). So we do it: after each
micro-batch's backward a hook adds every low-precision parameter's gradient into an FP32 buffer and
frees it; just before the step's gradient reductions the sum is written back as the parameter's
gradient, rounded once instead of once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MethodType
from typing import Any

import torch


class FP32GradAccumulator:
    """Per-parameter FP32 gradient sums, filled by post-accumulate-grad hooks, flushed into ``.grad``."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        self.params = [p for p in params if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)]
        self.sums: dict[int, torch.Tensor] = {}
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._add)

    def _add(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        acc = self.sums.get(id(p))
        if acc is None:
            # Kept as it is until a second micro-batch comes: a one-micro-batch step then pays no
            # FP32 round trip (1.3B parameters: 16 GB of memory traffic), for the same gradient.
            self.sums[id(p)] = p.grad
        elif acc.dtype != torch.float32:
            self.sums[id(p)] = acc.float().add_(p.grad)
        else:
            acc.add_(p.grad)
        p.grad = None

    def flush(self) -> None:
        """Write each FP32 sum back as the parameter's gradient (in its dtype); idempotent."""
        for p in self.params:
            acc = self.sums.pop(id(p), None)
            if acc is not None:
                p.grad = acc.to(p.dtype)  # no copy when acc is the one micro-batch's gradient


def install_fp32_grad_accumulation(engine: Any) -> FP32GradAccumulator:
    """Accumulate ``engine``'s low-precision gradients in FP32; flush before the step's reductions."""
    from deepspeed.runtime.pipe import schedule

    acc = FP32GradAccumulator(engine.module.parameters())
    base = type(engine)._INSTRUCTION_MAP
    table = dict(base)
    for instr in (schedule.ReduceTiedGrads, schedule.ReduceGrads):
        original = base[instr]

        def flushed(self: Any, _original: Any = original, **kwargs: Any) -> Any:
            acc.flush()
            return MethodType(_original, self)(**kwargs)

        table[instr] = flushed
    engine._INSTRUCTION_MAP = table  # instance attribute: this engine only
    return acc
