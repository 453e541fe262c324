"""Where a GPU waits for its host: idle time on the device timeline of a profiled step, by what the host
was doing meanwhile.

A step's wall time exceeds its kernel time by the stretches in which no kernel (or copy) runs. While
the host only queues work it stays ahead of the device and such stretches do not occur; they follow a
synchronization (``.item()``, ``.tolist()``, a blocking host-to-device copy, an explicit synchronize),
after which the device waits until the host has queued the next kernel. So each idle stretch is charged
to the host range open at that moment: the pipeline instruction (LoadMicroBatch, ForwardPass,
BackwardPass, ReduceGrads, OptimizerStep, ...) the host was executing. The host-side synchronization
calls inside each range are counted as well, since they are the usual cause.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# CUDA runtime calls after which the host has caught up with the device (PyTorch's blocking copies and
# .item() end in cudaStreamSynchronize).
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"})
OUTSIDE = "(between instructions)"


@dataclass
class RangeIdle:
    """One host range name's totals over a profiled step."""

    name: str
    calls: int = 0
    host_ms: float = 0.0
    idle_ms: float = 0.0
    syncs: int = 0
    sync_ms: float = 0.0


@dataclass
class IdleReport:
    window_ms: float
    busy_ms: float
    idle_ms: float
    by_range: list[RangeIdle] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"window_ms": self.window_ms, "busy_ms": self.busy_ms, "idle_ms": self.idle_ms,
                "by_range": [vars(r) for r in self.by_range]}


def merge(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, as sorted disjoint intervals (touching ones joined)."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def idle_by_range(device: Sequence[tuple[float, float]], ranges: Sequence[tuple[str, float, float]],
                  syncs: Sequence[tuple[float, float]] = ()) -> IdleReport:
    """Device idle time charged to host ranges. Times in ms on one clock.

    ``device``: (start, end) of every kernel, copy and fill; ``ranges``: (name, start, end) of the host
    ranges, not overlapping each other (ends may touch); ``syncs``: (start, end) of host synchronization
    calls. The window runs from the first range's start to the later of the last range's end and the
    last device activity's end; idle time in it outside every range goes to ``OUTSIDE``.
    """
    if not ranges:
        raise ValueError("no host ranges recorded")
    busy = merge(device)
    start = min(r[1] for r in ranges)
    end = max([r[2] for r in ranges] + [e for _, e in busy])
    gaps, cursor = [], start
    for s, e in busy:
        if e <= start:
            continue
        if s > cursor:
            gaps.append((cursor, min(s, end)))
        cursor = max(cursor, e)
    if cursor < end:
        gaps.append((cursor, end))
    totals: dict[str, RangeIdle] = {}
    covered = 0.0
    for name, s, e in sorted(ranges, key=lambda r: r[1]):
        r = totals.setdefault(name, RangeIdle(name))
        r.calls += 1
        r.host_ms += e - s
        idle = sum(_overlap((s, e), g) for g in gaps)
        r.idle_ms += idle
        covered += idle
        for a, b in syncs:
            if s <= a < e:
                r.syncs += 1
                r.sync_ms += b - a
    idle_total = sum(e - s for s, e in gaps)
    outside = RangeIdle(OUTSIDE, idle_ms=max(0.0, idle_total - covered))
    for a, b in syncs:
        if not any(s <= a < e for _, s, e in ranges):
            outside.syncs += 1
            outside.sync_ms += b - a
    rows = sorted(totals.values(), key=lambda r: -r.idle_ms)
    if outside.idle_ms > 0 or outside.syncs:
        rows.append(outside)
    busy_ms = sum(_overlap((start, end), b) for b in busy)
    return IdleReport(window_ms=end - start, busy_ms=busy_ms, idle_ms=idle_total, by_range=rows)


def format_report(report: IdleReport, device: bool = True) -> list[str]:
    """Table lines: per host range, its calls, host time, synchronizations and (``device``) the device's
    idle time meanwhile."""
    if device:
        share = report.idle_ms / report.window_ms if report.window_ms else 0.0
        lines = [f"device idle {report.idle_ms:.1f} ms of {report.window_ms:.1f} ms ({share:.1%}); "
                 f"by what the host was running meanwhile:",
                 f"  {'host range':<26} {'calls':>5} {'host ms':>9} {'idle ms':>9} {'syncs':>6} {'sync ms':>8}"]
        lines += [f"  {r.name:<26} {r.calls:>5} {r.host_ms:>9.2f} {r.idle_ms:>9.2f} {r.syncs:>6} {r.sync_ms:>8.2f}"
                  for r in report.by_range]
        return lines
    lines = ["host time by pipeline instruction (no device timeline here):",
             f"  {'host range':<26} {'calls':>5} {'host ms':>9}"]
    lines += [f"  {r.name:<26} {r.calls:>5} {r.host_ms:>9.2f}" for r in report.by_range if r.name != OUTSIDE]
    return lines
