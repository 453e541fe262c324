"""Where a training step's time goes: the time of each DeepSpeed pipeline instruction (``run.timers``).

DeepSpeed's pipeline engine runs a step as a list of instructions (load a micro-batch, forward,
backward, send/receive activations and gradients between stages, reduce gradients, optimizer step),
each a method in the engine's instruction table. Wrapping the table's entries times every instruction
without touching DeepSpeed's code; the same hook lets a benchmark annotate them for a profiler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

# Instruction class names -> metric names (time_<name>_s in metrics.jsonl).
METRIC_NAMES = {
    "LoadMicroBatch": "load",
    "ForwardPass": "forward",
    "BackwardPass": "backward",
    "SendActivation": "send_activation",
    "RecvActivation": "recv_activation",
    "SendGrad": "send_grad",
    "RecvGrad": "recv_grad",
    "ReduceTiedGrads": "reduce_tied_grads",
    "ReduceGrads": "reduce_grads",
    "OptimizerStep": "optimizer",
}

Wrapper = Callable[[type, Callable[..., Any]], Callable[..., Any]]


def wrap_instructions(engine: Any, wrap: Wrapper) -> Callable[[], None]:
    """Replace every entry ``fn`` of ``engine``'s instruction table by ``wrap(kind, fn)``, for this engine
    only (an instance attribute, as train/grad_accum.py sets its own); return a function that undoes it."""
    table = engine._INSTRUCTION_MAP
    own = "_INSTRUCTION_MAP" in vars(engine)
    engine._INSTRUCTION_MAP = {kind: wrap(kind, fn) for kind, fn in table.items()}

    def undo() -> None:
        if own:
            engine._INSTRUCTION_MAP = table
        else:
            del engine._INSTRUCTION_MAP

    return undo


class InstructionTimers:
    """Seconds spent in each instruction since the last :meth:`pop`, summed over its calls.

    On a GPU the device is synchronized before and after each instruction (as Megatron-LM's timers do),
    so each time is the instruction's device work and not just the host's time to queue it; that costs
    the overlap of host and device at the boundaries, a small share of a step. Receive times include
    waiting for the neighbouring stage: the pipeline's bubble as this rank sees it.
    """

    def __init__(self, engine: Any) -> None:
        self.seconds: dict[str, float] = {}
        self._sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        self.undo = wrap_instructions(engine, self._timed)

    def _timed(self, kind: type, fn: Callable[..., Any]) -> Callable[..., Any]:
        name = METRIC_NAMES.get(kind.__name__, kind.__name__)

        def run_timed(engine: Any, *args: Any, **kwargs: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(engine, *args, **kwargs)
            finally:
                self._sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return run_timed

    def pop(self) -> dict[str, float]:
        """``{"time_<instruction>_s": seconds}`` since the last call, then start afresh."""
        out = {f"time_{name}_s": s for name, s in self.seconds.items()}
        self.seconds = {}
        return out
