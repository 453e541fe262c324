"""Model FLOPs utilization of GLM training through our DeepSpeed engine on one device.

    python3 benchmarks/gpu_mfu.py [--model glm-1b] [--micro-batch 8] [--steps 20] [--json FILE]
    python3 benchmarks/gpu_mfu.py --device cpu --layers 2 --hidden 128 --heads 4 --seq 128 \
        --micro-batch 2 --steps 3 --precision fp32          (the same code path on a CPU)

The model is ``configs/model/<--model>.yaml`` (default glm-1b: 24 layers, d=2048, 32 heads, sequence
2048) with any of --layers/--hidden/--heads/--seq/--vocab overriding it, built by
``glm_train.train.engine.build_engine`` exactly as a run builds it (tp = pp = dp = 1, ZeRO-1, the
precision's DeepSpeed optimizer, torch AdamW) and stepped with ``engine.train_batch``. The batches are
synthetic but shaped like GLM's: random tokens, 1D positions, a Part A of ``(1 - scored_fraction) *
seq`` tokens (bidirectional; ``--part-a per-sample``: a length drawn per sample with that mean) and a
Part B that is causal and scored; the data pipeline's own cost is not included
(benchmarks/data_pipeline.py measures it).

Timing: ``--warmup`` steps, then ``--steps`` steps, each between ``torch.cuda.synchronize()`` calls.
FLOPs per token come from ``glm_train/train/flops.py`` (matmuls only, training = 3 x forward, the
head on the scored share; recomputation by activation checkpointing counted only in the hardware
figure). The peak is measured in the same process right after the timed steps (the GPU as warm as
during training): a square ``--peak-size`` matmul in the training dtype timed with CUDA events (mean
of 10 after 3 warm-ups); the datasheet's dense figure is reported beside it where the GPU is known.
On a CPU the peak matmul is timed with ``time.perf_counter``.

Exit status 3 with ``"status": "oom"`` in the JSON when the run does not fit in GPU memory, so a
caller can retry with a smaller micro-batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's datasheets, by precision.
DATASHEET_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


def datasheet_peak(device_name: str, precision: str) -> float | None:
    for key, peaks in DATASHEET_TFLOPS.items():  # most specific names first
        if all(part in device_name for part in key.split()):
            return peaks.get(precision)
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="glm-1b", help="preset in configs/model/ (default glm-1b)")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--seq", type=int, help="sequence length")
    p.add_argument(
        "--vocab",
        type=int,
        default=50304,
        help="vocabulary, padded up to the preset's pad_vocab_multiple (default 50304 -> 50432 for glm-1b; "
        "the demo tokenizer gives 8192, GLM-130B's 150528)",
    )
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument(
        "--checkpoint-interval", type=int, default=0, help="parallel.activation_checkpoint_interval (0: off)"
    )
    p.add_argument(
        "--scored-fraction",
        type=float,
        default=0.5,
        help="share of each sequence in Part B (scored; the head runs there only)",
    )
    p.add_argument("--part-a", choices=["one", "per-sample"], default="one",
                   help="one Part A length for every sample (default), or one drawn per sample (GLM's real "
                        "batches: split attention then makes one Part-A call per sample)")
    p.add_argument("--dropout", type=float, help="override the preset's hidden and attention dropout")
    p.add_argument("--attention-impl", choices=["auto", "sdpa", "split", "eager"],
                   help="model.attention_impl (default: the preset's)")
    p.add_argument("--compile", action="store_true", help="train.compile (torch.compile each block)")
    p.add_argument("--optimizer-impl", choices=["auto", "fused", "foreach", "for_loop"], default="auto",
                   help="train.optimizer_impl (AdamW kernel; default auto: torch's choice)")
    p.add_argument("--head-chunk", type=int,
                   help="train.head_chunk (scored tokens per fused head chunk; 0: the whole head; default: the "
                        "config's, 4096)")
    p.add_argument("--selective", default="", help="parallel.selective_recompute, e.g. attention,geglu")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument(
        "--peak-size", type=int, help="square matmul size for the peak (default 8192; 1024 on CPU)"
    )
    p.add_argument("--profile-top", type=int, default=0,
                   help="after the timed steps, profile two more (the first a warm-up) and report the second's N "
                        "costliest kernels and the device's idle time by pipeline instruction")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    import yaml

    from glm_train.config import GLMConfig, ModelConfig, OptimizerImpl, Precision, validate

    preset = yaml.safe_load((REPO / "configs" / "model" / f"{args.model}.yaml").read_text())
    model = ModelConfig(**preset)
    for attr, val in [
        ("layers", args.layers),
        ("hidden", args.hidden),
        ("heads", args.heads),
        ("seq_length", args.seq),
    ]:
        if val is not None:
            setattr(model, attr, val)
    if args.dropout is not None:
        model.dropout = model.attention_dropout = args.dropout
    if args.attention_impl:
        model.attention_impl = args.attention_impl
    model.vocab_size = int(math.ceil(args.vocab / model.pad_vocab_multiple) * model.pad_vocab_multiple)
    cfg = GLMConfig(model=model)
    cfg.precision = Precision(args.precision)
    cfg.train.micro_batch = args.micro_batch
    cfg.train.global_batch = args.micro_batch * args.grad_accum
    cfg.train.iters = args.warmup + args.steps
    cfg.train.warmup_iters = 0
    cfg.train.progress = False
    cfg.parallel.zero_stage = 1
    cfg.parallel.activation_checkpoint_interval = args.checkpoint_interval
    cfg.parallel.selective_recompute = [x for x in args.selective.split(",") if x]
    cfg.train.compile = args.compile
    cfg.train.head_chunk = args.head_chunk
    cfg.train.optimizer_impl = OptimizerImpl(args.optimizer_impl)
    cfg.eval.every = 0
    validate(cfg, check_paths=False)
    return cfg


def synthetic_batches(cfg: Any, scored_fraction: float, grad_accum: int,
                      per_sample: bool = False) -> tuple[list[Any], float]:
    """One optimizer step's micro-batches and the exact scored share of positions.

    ``per_sample``: each sample's Part B length drawn uniformly from 1 .. 2 x the mean - 1 (as GLM's
    real batches, where split attention makes one Part-A call per sample), not one length for all."""
    import torch

    m, b = cfg.model, cfg.train.micro_batch
    s = m.seq_length
    g = torch.Generator().manual_seed(cfg.train.seed)
    part_b = max(1, min(s - 1, round(s * scored_fraction)))
    positions = torch.arange(s).expand(b, s).contiguous()
    out, scored = [], []
    for _ in range(grad_accum):
        ids = torch.randint(0, m.vocab_size, (b, s), generator=g)
        targets = torch.randint(0, m.vocab_size, (b, s), generator=g)
        lengths = (torch.randint(1, 2 * part_b, (b,), generator=g).clamp(max=s - 1) if per_sample
                   else torch.full((b,), part_b))
        prefix = (s - lengths).long()
        loss_mask = (positions >= prefix.unsqueeze(1)).float()
        scored.append(loss_mask.mean())
        out.append(((ids, positions, prefix), (targets, loss_mask)))
    return out, float(torch.stack(scored).mean())


def peak_matmul_tflops(device: str, dtype: Any, n: int) -> float:
    """Mean TFLOP/s of an n x n x n matmul: 10 timed after 3 warm-ups (CUDA events on a GPU)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, device=device, dtype=torch.float32).to(dtype)
    for _ in range(3):
        torch.matmul(a, b)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(10):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    del a, b
    return 2 * n**3 / statistics.mean(times) / 1e12


def profile_step(engine: Any, batches: list[Any], cuda: bool, top: int) -> dict[str, Any]:
    """One more training step under torch.profiler (after an untimed warm-up step under it, which takes
    the tracer's start-up): wall time, device busy time, the ``top`` costliest kernels (ops on a CPU) by
    self time, each kernel counted once (not also under its aten op), and the device's idle time by the
    pipeline instruction the host was running meanwhile (benchmarks/idle.py)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from benchmarks.idle import SYNC_CALLS, format_report, idle_by_range
    from glm_train.train.timers import wrap_instructions

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    got: dict[str, Any] = {}

    def ready(prof: Any) -> None:
        got["events"], got["averages"] = prof.events(), prof.key_averages()

    def ranged(kind: type, fn: Any) -> Any:  # each pipeline instruction as a named host range
        def run_instruction(self: Any, *args: Any, **kwargs: Any) -> Any:
            with record_function(f"pipe/{kind.__name__}"):
                return fn(self, *args, **kwargs)
        return run_instruction

    undo = wrap_instructions(engine, ranged)
    try:
        with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=1), on_trace_ready=ready) as prof:
            for _ in range(2):
                t0 = time.perf_counter()
                engine.train_batch(iter(batches))
                if cuda:
                    torch.cuda.synchronize()
                wall_ms = (time.perf_counter() - t0) * 1e3
                prof.step()
    finally:
        undo()
    rows = []
    for ev in got["averages"]:
        if cuda:
            # Kernels only: aten ops would count them twice, and so would the GPU-side ranges of
            # record_function annotations (such as "Optimizer.step#AdamW.step").
            if ev.device_type != DeviceType.CUDA or getattr(ev, "is_user_annotation", False):
                continue
            t = ev.self_device_time_total
        else:
            t = ev.self_cpu_time_total
        if t > 0 and not ev.key.startswith(("pipe/", "ProfilerStep")):
            rows.append({"name": ev.key[:100], "self_ms": t / 1e3, "calls": ev.count})
    rows.sort(key=lambda r: -r["self_ms"])
    busy = sum(r["self_ms"] for r in rows)
    for r in rows:
        r["share"] = r["self_ms"] / busy if busy else 0.0
    what = "GPU kernel" if cuda else "CPU op self"
    print(f"profiled step: {wall_ms:.1f} ms wall (profiler on), {busy:.1f} ms of {what} time; the costliest:")
    for r in rows[:top]:
        print(f"  {r['self_ms']:9.2f} ms {r['share']:6.1%} {r['calls']:6d}x  {r['name']}")
    events = got["events"]
    ms = [(ev, ev.time_range.start / 1e3, ev.time_range.end / 1e3) for ev in events]
    ranges = [(ev.name[5:], s, e) for ev, s, e in ms if ev.device_type == DeviceType.CPU and ev.name.startswith("pipe/")]
    device = [(s, e) for ev, s, e in ms
              if ev.device_type == DeviceType.CUDA and not getattr(ev, "is_user_annotation", False)]
    syncs = [(s, e) for ev, s, e in ms if ev.device_type == DeviceType.CPU and ev.name in SYNC_CALLS]
    report = idle_by_range(device, ranges, syncs)
    for line in format_report(report, device=cuda):
        print(line)
    host = [{"name": r.name, "calls": r.calls, "host_ms": r.host_ms, "syncs": r.syncs}
            for r in report.by_range if r.calls]
    return {"wall_ms": wall_ms, "busy_ms": busy, "kernels": len(rows), "top": rows[:top],
            "idle": report.as_dict() if cuda else None, "host_ranges": host}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu":
        # glm_train.env then picks gloo and DeepSpeed's CPU accelerator.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cfg = build_config(args)
    from glm_train.env import setup_environment

    backend = setup_environment()
    import torch
    import torch.distributed as dist

    from glm_train.config import AttentionImpl, OptimizerImpl, head_chunk
    from glm_train.model.embedding import GLMEmbedding
    from glm_train.train.engine import build_engine, fused_adamw
    from glm_train.train.flops import hardware_flops_per_token, model_flops_per_token, recomputed_blocks

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device (use --device cpu)")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    device_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    m = cfg.model
    res: dict[str, Any] = {
        "status": "ok",
        "device": device_name,
        "torch": torch.__version__,
        "precision": args.precision,
        "model": args.model,
        "layers": m.layers,
        "hidden": m.hidden,
        "heads": m.heads,
        "ffn": m.ffn_size(),
        "seq": m.seq_length,
        "vocab": m.vocab_size,
        "dropout": m.dropout,
        "attention_dropout": m.attention_dropout,
        "attention_impl": str(getattr(m.attention_impl, "value", m.attention_impl)),
        "attention_kernel": AttentionImpl(m.attention_impl).resolve(args.device).value,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "activation_checkpoint_interval": args.checkpoint_interval,
        "selective_recompute": args.selective,
        "compile": args.compile,
        "head_chunk": head_chunk(cfg),
        "optimizer_impl": args.optimizer_impl,
        "adamw": "fused" if fused_adamw(OptimizerImpl(args.optimizer_impl)) else args.optimizer_impl,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    engine, _ = build_engine(cfg, backend)
    res["parameters"] = sum(p.numel() for p in engine.module.parameters())
    alpha = cfg.stability.egs if isinstance(cfg.stability.egs, (int, float)) else 1.0
    for mod in engine.module.modules():
        if isinstance(mod, GLMEmbedding):
            mod.egs_alpha = float(alpha)  # as the trainer sets it each step
    batches, scored = synthetic_batches(cfg, args.scored_fraction, args.grad_accum, args.part_a == "per-sample")
    res["scored_fraction"] = scored
    res["part_a"] = args.part_a

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = engine.train_batch(iter(batches))
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"non-finite loss: {losses}")

    if args.profile_top:
        res["profile"] = profile_step(engine, batches, cuda, args.profile_top)
    if cuda:
        res["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        res["alloc_conf"] = os.environ.get("PYTORCH_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        res["device_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    # The peak right after training, on a GPU as warm (clocks, power) as the timed steps.
    peak_n = args.peak_size or (8192 if cuda else 1024)
    res["peak_matmul_size"] = peak_n
    res["peak_tflops_measured"] = peak_matmul_tflops("cuda" if cuda else "cpu", dtype, peak_n)
    res["peak_tflops_datasheet"] = datasheet_peak(device_name, args.precision) if cuda else None

    tokens_per_step = cfg.train.global_batch * m.seq_length
    total = sum(times)
    mflops = model_flops_per_token(m, m.seq_length, scored)
    hflops = hardware_flops_per_token(m, m.seq_length, scored, args.checkpoint_interval,
                                      cfg.parallel.selective_recompute)
    tok_s = tokens_per_step * len(times) / total
    achieved = tok_s * mflops / 1e12
    res.update(
        {
            "tokens_per_step": tokens_per_step,
            "step_time_mean_s": total / len(times),
            "step_time_median_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "tokens_per_s": tok_s,
            "model_gflops_per_token": mflops / 1e9,
            "model_gflops_per_token_all_positions": model_flops_per_token(m, m.seq_length, 1.0) / 1e9,
            "hardware_gflops_per_token": hflops / 1e9,
            "recomputed_blocks": recomputed_blocks(m.layers, args.checkpoint_interval),
            "model_tflops": achieved,
            "hardware_tflops": tok_s * hflops / 1e12,
            "mfu_vs_measured_peak": achieved / res["peak_tflops_measured"],
            "mfu_vs_datasheet": (achieved / res["peak_tflops_datasheet"])
            if res["peak_tflops_datasheet"]
            else None,
            "step_times_s": times,
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }
    )
    # Read again after DeepSpeed and the engine are set up: the flags the training ran under.
    res["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    res["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return res


def print_table(res: dict[str, Any]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    rows = [
        ("device", res.get("device")),
        (
            "model (preset + overrides)",
            f"{res.get('model')}: L={res.get('layers')} d={res.get('hidden')} heads={res.get('heads')} "
            f"ffn={res.get('ffn')} seq={res.get('seq')} vocab={res.get('vocab')} "
            f"params={res.get('parameters', 0) / 1e9:.3f}B",
        ),
        (
            "precision / micro-batch x accum",
            f"{res.get('precision')} / {res.get('micro_batch')} x {res.get('grad_accum')}",
        ),
        (
            "activation checkpointing",
            f"interval {res.get('activation_checkpoint_interval')} "
            f"({res.get('recomputed_blocks')} blocks recomputed)",
        ),
        (
            "attention / compile / AdamW",
            f"{res.get('attention_impl')} / {res.get('compile')} / {res.get('optimizer_impl')}",
        ),
        ("scored fraction (Part B)", res.get("scored_fraction")),
        ("Part A lengths", res.get("part_a")),
        (
            "step time mean / median (s)",
            f"{fmt(res.get('step_time_mean_s'))} / {fmt(res.get('step_time_median_s'))}",
        ),
        ("tokens/s", res.get("tokens_per_s")),
        ("model GFLOP/token (head on Part B)", res.get("model_gflops_per_token")),
        ("model GFLOP/token (head everywhere)", res.get("model_gflops_per_token_all_positions")),
        ("achieved model TFLOP/s", res.get("model_tflops")),
        ("achieved hardware TFLOP/s", res.get("hardware_tflops")),
        (f"peak TFLOP/s measured ({res.get('peak_matmul_size')}^3 matmul)", res.get("peak_tflops_measured")),
        ("peak TFLOP/s datasheet", res.get("peak_tflops_datasheet")),
        ("MFU vs measured peak", res.get("mfu_vs_measured_peak")),
        ("MFU vs datasheet", res.get("mfu_vs_datasheet")),
        ("peak memory allocated (GiB)", res.get("peak_memory_allocated_gib")),
        ("peak memory reserved (GiB)", res.get("peak_memory_reserved_gib")),
        ("CUDA allocator settings", res.get("alloc_conf")),
        ("TF32 matmul / fp32 precision", f"{res.get('tf32_matmul')} / {res.get('float32_matmul_precision')}"),
        ("loss first -> last", f"{fmt(res.get('first_loss'))} -> {fmt(res.get('last_loss'))}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {fmt(v)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = run(args)
        code = 0
    except Exception as e:  # noqa: BLE001 - an OOM is a result (retry smaller), anything else is reported
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        res = {
            "status": "oom" if oom else "error",
            "micro_batch": args.micro_batch,
            "error": f"{type(e).__name__}: {str(e)[:2000]}",
        }
        code = 3 if oom else 1
        if not oom:
            import traceback

            traceback.print_exc()
        try:  # leave no process group behind (an NCCL group left open can hang the exit)
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    if res["status"] == "ok":
        print_table(res)
    else:
        print(f"gpu_mfu: {res['status']} at micro-batch {args.micro_batch}: {res['error'][:500]}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
