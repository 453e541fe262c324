"""glm-plan against measured peak memory: train a few steps of several configs and print the planner's
estimate beside the measured peak of allocated bytes.

    python benchmarks/plan_check.py [--json FILE] [--only NAME [--explain]]   (each config in its own process)

On a GPU it reads torch.cuda.max_memory_allocated. Without one it runs CPU-sized configs and takes the
CPU analogue: the peak of live tensor bytes, from the allocation and free events that torch.profiler
records with profile_memory=True (a running sum over time, from before the engine is built to the end
of the last step). The growth of peak resident memory (RSS) is reported beside it; it also counts
allocator arenas and freed pages not yet returned, which made it swing by 10-20% between runs.
``--explain`` prints the live allocations at the peak, grouped by the op that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (overrides); synthetic GLM batches, vocabulary fixed in each.
CONFIGS = {
    "toy-L8-d512-fp32": ["model.layers=8", "model.hidden=512", "model.heads=8", "model.seq_length=512",
                         "model.vocab_size=8192", "train.micro_batch=8", "train.global_batch=8", "precision=fp32"],
    "L12-d1024-bf16": ["model.layers=12", "model.hidden=1024", "model.heads=16", "model.seq_length=1024",
                       "model.vocab_size=32768", "train.micro_batch=8", "train.global_batch=16", "precision=bf16"],
    "glm-1b-bf16-mb8": ["model=glm-1b", "model.vocab_size=50304", "model.dropout=0", "model.attention_dropout=0",
                        "train.micro_batch=8", "train.global_batch=8", "precision=bf16"],
    "glm-1b-bf16-mb8-wholehead": ["model=glm-1b", "model.vocab_size=50304", "model.dropout=0",
                                  "model.attention_dropout=0", "train.micro_batch=8", "train.global_batch=8",
                                  "precision=bf16", "train.head_chunk=0"],
    "glm-1b-bf16-mb8-compile": ["model=glm-1b", "model.vocab_size=50304", "train.micro_batch=8",
                                "train.global_batch=8", "precision=bf16", "train.compile=true"],
    "glm-1b-bf16-mb4-recompute": ["model=glm-1b", "model.vocab_size=50304", "train.micro_batch=4",
                                  "train.global_batch=8", "precision=bf16",
                                  "parallel.activation_checkpoint_interval=1"],
}

_L8 = ["model.layers=8", "model.hidden=512", "model.heads=8", "model.seq_length=512", "model.vocab_size=8192",
       "train.micro_batch=8", "train.global_batch=8", "precision=fp32", "parallel.zero_stage=0"]
# The same in bf16 (ZeRO-1: DeepSpeed's bf16 optimizer): on CPUs with native bf16 dot products its
# attention keeps S x S probabilities (model/prefix_blocks.py's matmul kernel), rebuilt when recomputed.
_L8_BF16 = [x.replace("fp32", "bf16").replace("zero_stage=0", "zero_stage=1") for x in _L8]

# A large vocabulary on a small model: the head decides the peak, whole (FP32 softmax and its gradients
# for backward) or fused in chunks of 512 scored tokens (train.head_chunk).
_HEAD = ["model.layers=2", "model.hidden=256", "model.heads=4", "model.seq_length=512", "model.vocab_size=65536",
         "train.micro_batch=8", "train.global_batch=8", "precision=fp32", "parallel.zero_stage=0"]

# On CPU: model state and activations of hundreds of MB each, all eleven in under 5 minutes on 2 cores
# (167 s here).
# Between them they take each of the planner's peak phases: the loss's backward with and without the
# gradients already there (one or two micro-batches per step), one block's backward (full
# recomputation with eager attention, whose S x S matrices it rebuilds), and the optimizer step
# (bf16 with ZeRO-1, FP32 gradient sums and DeepSpeed's two reduction buckets).
CPU_CONFIGS = {
    "cpu-L8-d512-fp32-mb8": _L8,
    "cpu-L4-d1024-fp32-mb1x2": ["model.layers=4", "model.hidden=1024", "model.heads=8", "model.seq_length=1024",
                                "model.vocab_size=16384", "train.micro_batch=1", "train.global_batch=2",
                                "precision=fp32", "parallel.zero_stage=0"],
    "cpu-L8-d512-fp32-mb8-selective": _L8 + ["parallel.selective_recompute=[attention,geglu]"],
    "cpu-L8-d512-fp32-mb8-eager-recompute": _L8 + ["model.attention_impl=eager",
                                                   "parallel.activation_checkpoint_interval=1"],
    "cpu-L8-d512-fp32-mb8-compile": _L8 + ["train.compile=true"],
    "cpu-L8-d512-bf16-mb8": _L8_BF16,
    "cpu-L8-d512-bf16-mb8-selective": _L8_BF16 + ["parallel.selective_recompute=[attention]"],
    "cpu-L8-d512-bf16-mb8-compile": _L8_BF16 + ["train.compile=true"],
    "cpu-L2-d256-V64k-fp32-mb8-wholehead": _HEAD + ["train.head_chunk=0"],
    "cpu-L2-d256-V64k-fp32-mb8-fused": _HEAD + ["train.head_chunk=512"],
    "cpu-L2-d256-V64k-bf16-mb8-fused-compile": [x.replace("fp32", "bf16").replace("zero_stage=0", "zero_stage=1")
                                                for x in _HEAD] + ["train.head_chunk=512", "train.compile=true"],
    "cpu-L4-d768-bf16-zero1-mb4x2": ["model.layers=4", "model.hidden=768", "model.heads=12", "model.seq_length=512",
                                     "model.vocab_size=8192", "train.micro_batch=4", "train.global_batch=8",
                                     "precision=bf16", "parallel.zero_stage=1"],
}

STEPS = 2
"""Steps trained: the second is the first with Adam's moments allocated, the steady state."""


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocation_events(prof: Any) -> list[tuple[int, int, int, str]]:
    """(time ns, bytes: + allocated / - freed, address, op chain) of every CPU allocation event, in order."""
    import torch

    alloc_type = torch._C._profiler._ExtraFields_Allocation
    out: list[tuple[int, int, int, str]] = []
    stack = [(node, "") for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:  # iterative: the op tree of a training step is deep
        node, chain = stack.pop()
        fields = node.extra_fields
        if isinstance(fields, alloc_type):
            if fields.device.type == "cpu":
                out.append((node.start_time_ns, fields.alloc_size, fields.ptr, chain))
            continue
        sub = f"{chain}>{node.name}"[-160:]
        stack.extend((child, sub) for child in node.children)
    out.sort(key=lambda e: e[0])
    return out


def peak_live_bytes(events: list[tuple[int, int, int, str]]) -> tuple[int, int]:
    """(peak of the running sum of allocated minus freed bytes, index of the event that reached it)."""
    live = peak = index = 0
    for i, (_, size, _, _) in enumerate(events):
        live += size
        if live > peak:
            peak, index = live, i
    return peak, index


def explain(events: list[tuple[int, int, int, str]], index: int, top: int = 30) -> None:
    """Print the allocations live at event ``index``, grouped by (allocating op chain, size)."""
    live: dict[int, tuple[int, str]] = {}
    for _, size, ptr, chain in events[:index + 1]:
        if size > 0:
            live[ptr] = (size, chain)
        else:
            live.pop(ptr, None)
    groups: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for size, chain in live.values():
        g = groups[(chain[-100:], size)]
        g[0] += size
        g[1] += 1
    print(f"peak at: {events[index][3][-120:]}")
    for (chain, size), (total, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{total / 2**20:10.1f} MiB = {n:3d} x {size / 2**20:8.3f}  {chain}")


def run_one(name: str, show: bool = False) -> dict:
    import torch

    from glm_train.config import load_config
    from glm_train.env import setup_environment
    from glm_train.train.engine import build_engine
    from glm_train.train.plan import GIB, plan

    cuda = torch.cuda.is_available()
    overrides = CONFIGS[name] if cuda else CPU_CONFIGS[name]
    setup_environment()
    cfg = load_config(overrides, check_paths=False)
    m = cfg.model
    if m.vocab_size % m.pad_vocab_multiple:
        m.vocab_size += m.pad_vocab_multiple - m.vocab_size % m.pad_vocab_multiple
    est = plan(cfg, 1, "gpu" if cuda else "cpu")["worst"]
    s, b, v = m.seq_length, cfg.train.micro_batch, m.vocab_size
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def micro() -> tuple:
        ids = torch.randint(0, v - 8, (b, s), generator=g)
        # Prefix lengths in pairs p, s - p: every micro-batch scores exactly half its tokens, the
        # planner's f = 0.5, so the logits' share of the peak does not depend on the draw.
        half = torch.randint(s // 4, 3 * s // 4, (b // 2,), generator=g)
        prefix = torch.cat([half, s - half] + ([torch.tensor([s // 2])] if b % 2 else []))
        mask = (torch.arange(s)[None] >= prefix[:, None]).float()
        pos = torch.arange(s).expand(b, s).contiguous()
        return tuple(x.to(dev) for x in (ids, pos, prefix)), tuple(x.to(dev) for x in (ids.roll(1, 1), mask))

    def train() -> Any:
        engine, _ = build_engine(cfg, "nccl" if cuda else "gloo")
        n_micro = cfg.train.global_batch // b
        for _ in range(STEPS):
            engine.train_batch(iter([micro() for _ in range(n_micro)]))
        return engine

    rss0 = _rss()
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        train()
        measured = torch.cuda.max_memory_allocated()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine = train()
        events = allocation_events(prof)
        measured, index = peak_live_bytes(events)
        if show:
            explain(events, index)
        del engine
    dt = time.perf_counter() - t0
    estimate = est.peak  # allocated bytes; the 5% overhead stands for the allocator's reserve
    out = {"name": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "method": "max_memory_allocated" if cuda else "profiler live-tensor peak",
           "estimate_gib": estimate / GIB, "weights_gib": est.weights / GIB, "grads_gib": est.gradients / GIB,
           "grads_at_peak": est.grads_at_peak, "optimizer_gib": est.optimizer / GIB,
           "activations_gib": est.activations / GIB, "logits_gib": est.logits / GIB,
           "backward_gib": est.backward / GIB, "step_gib": max(est.step, 2 * est.bucket) / GIB,
           "peak_phase": est.peak_phase, f"seconds_{STEPS}_steps": dt,
           "measured_gib": measured / GIB, "error": estimate / measured - 1}
    if not cuda:
        out["rss_growth_gib"] = (_peak_rss() - rss0) / GIB
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--only")
    p.add_argument("--explain", action="store_true", help="with --only on CPU: what is live at the peak")
    args = p.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args.explain)), flush=True)
        return 0
    import torch

    names = list(CONFIGS) if torch.cuda.is_available() else list(CPU_CONFIGS)
    results = []
    t0 = time.perf_counter()
    for name in names:
        r = subprocess.run([sys.executable, __file__, "--only", name], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            results.append({"name": name, "failed": (r.stderr or r.stdout)[-1500:]})
            print(f"{name}: failed\n{results[-1]['failed']}", flush=True)
            continue
        results.append(json.loads(line[0][7:]))
    print(f"\n{'config':<38}{'estimate GiB':>13}{'measured GiB':>14}{'error':>8}{'RSS GiB':>9}"
          "   peak at (weights/grads/optim/step/activ/logits/backward)")
    for r in results:
        if "failed" in r:
            continue
        rss = f"{r['rss_growth_gib']:>9.2f}" if "rss_growth_gib" in r else f"{'-':>9}"
        grads = f"{r['grads_gib']:.2f}" + ("" if r["grads_at_peak"] else "*")
        print(f"{r['name']:<38}{r['estimate_gib']:>13.3f}{r['measured_gib']:>14.3f}{r['error']:>+8.1%}{rss}   "
              f"{r['peak_phase']} ({r['weights_gib']:.2f}/{grads}/{r['optimizer_gib']:.2f}/{r['step_gib']:.2f}/"
              f"{r['activations_gib']:.2f}/{r['logits_gib']:.2f}/{r['backward_gib']:.2f})")
    print(f"(* gradients not yet allocated at the activation peak)  total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
