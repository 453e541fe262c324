"""glm-plan against measured peak memory: train a few steps of several configs on one GPU, read
torch.cuda.max_memory_allocated, and print it beside the planner's estimate.

    python benchmarks/plan_check.py [--json FILE] [--only NAME]     (each config in its own process)

Without a GPU it runs CPU-sized configs and measures the growth of peak resident memory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name: (overrides); synthetic GLM batches, vocabulary fixed in each.
CONFIGS = {
    "toy-L8-d512-fp32": ["model.layers=8", "model.hidden=512", "model.heads=8", "model.seq_length=512",
                         "model.vocab_size=8192", "train.micro_batch=8", "train.global_batch=8", "precision=fp32"],
    "L12-d1024-bf16": ["model.layers=12", "model.hidden=1024", "model.heads=16", "model.seq_length=1024",
                       "model.vocab_size=32768", "train.micro_batch=8", "train.global_batch=16", "precision=bf16"],
    "glm-1b-bf16-mb8": ["model=glm-1b", "model.vocab_size=50304", "model.dropout=0", "model.attention_dropout=0",
                        "train.micro_batch=8", "train.global_batch=8", "precision=bf16"],
    "glm-1b-bf16-mb4-recompute": ["model=glm-1b", "model.vocab_size=50304", "train.micro_batch=4",
                                  "train.global_batch=8", "precision=bf16",
                                  "parallel.activation_checkpoint_interval=1"],
}


# On CPU: configs whose model state and activations dwarf the allocator's noise (hundreds of MB).
CPU_CONFIGS = {
    "cpu-L8-d512-fp32-mb8": ["model.layers=8", "model.hidden=512", "model.heads=8", "model.seq_length=512",
                             "model.vocab_size=8192", "train.micro_batch=8", "train.global_batch=8",
                             "precision=fp32", "parallel.zero_stage=0"],
    "cpu-L4-d1024-fp32-mb4": ["model.layers=4", "model.hidden=1024", "model.heads=8", "model.seq_length=1024",
                              "model.vocab_size=16384", "train.micro_batch=4", "train.global_batch=8",
                              "precision=fp32", "parallel.zero_stage=0"],
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_one(name: str) -> dict:
    import torch

    from glm_train.config import load_config
    from glm_train.env import setup_environment
    from glm_train.train.engine import build_engine
    from glm_train.train.plan import GIB, OVERHEAD, plan

    cuda = torch.cuda.is_available()
    overrides = CONFIGS[name] if cuda else CPU_CONFIGS[name]
    setup_environment()
    cfg = load_config(overrides, check_paths=False)
    m = cfg.model
    if m.vocab_size % m.pad_vocab_multiple:
        m.vocab_size += m.pad_vocab_multiple - m.vocab_size % m.pad_vocab_multiple
    est = plan(cfg, 1, "gpu" if cuda else "cpu")["worst"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss()
    engine, _ = build_engine(cfg, "nccl" if cuda else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    s, b, v = m.seq_length, cfg.train.micro_batch, m.vocab_size
    g = torch.Generator().manual_seed(0)

    def micro() -> tuple:
        ids = torch.randint(0, v - 8, (b, s), generator=g)
        prefix = torch.randint(s // 4, 3 * s // 4, (b,), generator=g)
        mask = (torch.arange(s)[None] >= prefix[:, None]).float()
        pos = torch.arange(s).expand(b, s).contiguous()
        return tuple(x.to(dev) for x in (ids, pos, prefix)), tuple(x.to(dev) for x in (ids.roll(1, 1), mask))

    n_micro = cfg.train.global_batch // b
    t0 = time.perf_counter()
    for _ in range(3):
        engine.train_batch(iter([micro() for _ in range(n_micro)]))
    dt = time.perf_counter() - t0
    # CPU: the growth of the process's peak resident memory over its size before the engine existed
    # (the interpreter, torch and DeepSpeed): a coarser measure than CUDA's allocator statistics.
    measured = torch.cuda.max_memory_allocated() if cuda else _peak_rss() - rss0
    estimate = est.total / OVERHEAD  # allocated bytes; the overhead term stands for the allocator's reserve
    out = {"name": name, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "estimate_gib": estimate / GIB, "weights_gib": est.weights / GIB, "grads_gib": est.gradients / GIB,
           "optimizer_gib": est.optimizer / GIB, "activations_gib": est.activations / GIB,
           "logits_gib": est.logits / GIB, "seconds_3_steps": dt}
    if measured is not None:
        out["measured_gib"] = measured / GIB
        out["error"] = estimate / measured - 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json")
    p.add_argument("--only")
    args = p.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only)), flush=True)
        return 0
    import torch

    names = list(CONFIGS) if torch.cuda.is_available() else list(CPU_CONFIGS)
    results = []
    for name in names:
        r = subprocess.run([sys.executable, __file__, "--only", name], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            results.append({"name": name, "failed": (r.stderr or r.stdout)[-1500:]})
            print(f"{name}: failed\n{results[-1]['failed']}", flush=True)
            continue
        results.append(json.loads(line[0][7:]))
    print(f"\n{'config':<28}{'estimate GiB':>13}{'measured GiB':>14}{'error':>8}   (weights/grads/optim/activ/logits)")
    for r in results:
        if "failed" in r:
            continue
        meas = f"{r['measured_gib']:>14.2f}{r['error']:>+8.1%}" if "measured_gib" in r else f"{'-':>14}{'-':>8}"
        print(f"{r['name']:<28}{r['estimate_gib']:>13.2f}{meas}   ({r['weights_gib']:.2f}/{r['grads_gib']:.2f}/"
              f"{r['optimizer_gib']:.2f}/{r['activations_gib']:.2f}/{r['logits_gib']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
