#!/usr/bin/env bash
# One-shot check of the GPU path on a single-GPU machine whose Python has torch (CUDA) but not
# DeepSpeed/Hydra/pydantic and no package index: everything else comes from .gpudeps/, filled
# beforehand on a machine with this project's .venv by `bash benchmarks/gpu_deps.sh`.
#
#     bash benchmarks/gpu_check.sh           (from the repository root, or anywhere)
#
# Sections, each under `timeout`, all within 7 min 50 s (GPU_CHECK_BUDGET_S, the issue's 8 minutes), in this order so
# that a run cut short has answered the main questions first:
#   0. environment: nvidia-smi -L, versions, `import deepspeed, hydra, omegaconf, glm_train`
#   2. python3 benchmarks/gpu_mfu.py: MFU of the ~1B GLM (configs/model/glm-1b.yaml) in bf16,
#      torch.compile, at the largest micro-batch glm-plan fits in this GPU's memory with 4 micro-batches
#      per optimizer step (a training run's gradient accumulation), then the same micro-batch with one,
#      both with a kernel profile of one extra step and the device's idle time in it by pipeline
#      instruction (benchmarks/idle.py)
#   1. python3 -m pytest -q -m gpu tests/test_gpu.py   (forward bf16/fp32 vs CPU, SDPA vs eager,
#      bf16 ZeRO-1 training + checkpoint + resume, eager and compiled, fp32 GPU vs CPU training)
#   5. python3 benchmarks/block_parts.py: split attention's own backward and the compiled GeGLU's two
#      projections, each against the plain form it replaced, at glm-1b's shape
#   2'. compiled with a Part A length per sample (GLM's real batches), eager, and compiled without
#      dropout, each with accumulation
#   3. python3 benchmarks/plan_check.py: glm-plan's memory estimate against measured peaks
#   2''. compiled with the whole head (train.head_chunk=0)
#   4. python3 benchmarks/head_loss.py: the head alone, whole / eager chunks / compiled chunks
# Logs and JSON go to $OUT (default /tmp/gpu_out); a summary table is printed at the end.
# Dry run without a GPU: PYTHON=.venv/bin/python GLM_GPU_TESTS_ON_CPU=1 GPU_MFU_MICRO_BATCHES=2 \
#   GPU_MFU_ARGS="--device cpu --layers 2 --hidden 128 --heads 4 --seq 128 --steps 3 --warmup 1" \
#   bash benchmarks/gpu_check.sh
# (with GPU_CHECK_MEM_GIB=78.7 as well, the micro-batches come from glm-plan as on an 80 GB H100)
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"   # all sections together; give the caller's timeout 30 s more
# Fallbacks below glm-plan's choice, and the micro-batches tried where there is no plan (no GPU: a dry run).
MICRO_BATCHES="${GPU_MFU_MICRO_BATCHES:-8 4 2 1}"
# Micro-batches per optimizer step in the accumulated runs. One optimizer step costs about what 1.6
# sequences do (the H200's compiled runs: 0.394 s at micro-batch 8, 1.050 s at 24, so 66 ms a step
# and 41 ms a sequence): the FP32 master's AdamW, ZeRO's copies, the FP64 gradient norm and the host
# synchronizations around them. A pre-training run's global batch (GLM-130B's 4224 sequences, a 1B
# model's ~500) is many micro-batches per GPU; 4 spreads that cost over most of it.
ACCUM="${GPU_MFU_ACCUM:-4}"
# 5 untimed steps (torch.compile compiles in the first) and 12 timed: step times vary by < 1% on a GPU;
# with accumulation 3 and 6, as many micro-batches as 24 steps of one.
STEPS_ARGS="--warmup 5 --steps 12"
ACCUM_STEPS_ARGS="--warmup 3 --steps 6"
MFU_ARGS="${GPU_MFU_ARGS:-}"  # "--device cpu --layers 2 ..." for a dry run (last: it overrides the above)
export PYTHONPATH="$PWD/.gpudeps/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning}"
unset DS_ACCELERATOR
rm -f "$OUT"/gpu_tests.jsonl "$OUT"/gpu_mfu*.json "$OUT"/gpu_mfu*.log "$OUT"/pytest.xml "$OUT"/status.txt

left() {  # seconds of the budget left (at least 1), capped at $1
    local rest=$((BUDGET_S - SECONDS))
    [ "$rest" -lt 1 ] && rest=1
    [ "$rest" -lt "$1" ] && echo "$rest" || echo "$1"
}
note() { echo "$1" | tee -a "$OUT/status.txt"; }

echo "== 0. environment ($(date -u +%FT%TZ))"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee -a "$OUT/nvidia-smi.txt"
else
    echo "nvidia-smi not found"
fi
test -d .gpudeps/site || echo "WARNING: .gpudeps/site is missing: run benchmarks/gpu_deps.sh and carry .gpudeps"
timeout -k 10 "$(left 120)" "$PY" - <<'EOF' 2>&1 | tee "$OUT/env.log"
import os
import platform

import torch

print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"available {torch.cuda.is_available()}  devices {torch.cuda.device_count()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
print(f"tf32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}, "
      f"float32_matmul_precision {torch.get_float32_matmul_precision()}, "
      f"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE={os.environ.get('TORCH_ALLOW_TF32_CUBLAS_OVERRIDE')}, "
      f"NVIDIA_TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE')}")
import deepspeed
import hydra
import omegaconf
import pydantic
import pydantic_core

import glm_train
from glm_train.env import setup_environment

for mod in (deepspeed, hydra, omegaconf, pydantic, pydantic_core, glm_train):
    print(f"{mod.__name__:14s} {getattr(mod, '__version__', '-'):10s} {os.path.dirname(mod.__file__)}")
try:
    import wandb  # noqa: F401

    print("wandb importable (not needed)")
except ImportError:
    print("wandb absent (fine: imported only with run.wandb=true)")
print("deepspeed accelerator:", deepspeed.get_accelerator().device_name(), "| backend for training:",
      "nccl" if torch.cuda.is_available() else "gloo")
EOF
env_rc=${PIPESTATUS[0]}
note "env: exit $env_rc"
if [ "$env_rc" != 0 ]; then
    note "the imports failed: nothing else can run (see $OUT/env.log)"
fi

# One gpu_mfu.py run: mfu NAME MICRO_BATCH CAP_S ARGS... -> $OUT/gpu_mfu_NAME.json, its exit status.
mfu() {
    local name=$1 mb=$2 cap=$3
    shift 3
    local t
    t=$(left "$cap")
    if [ "$t" -lt 45 ]; then
        note "mfu $name micro-batch $mb: no time left"
        return 124
    fi
    echo "-- mfu $name, micro-batch $mb ($((BUDGET_S - SECONDS)) s of budget left)"
    # shellcheck disable=SC2086
    timeout -k 10 "$t" "$PY" benchmarks/gpu_mfu.py --micro-batch "$mb" --json "$OUT/gpu_mfu_$name.json" \
        "$@" $MFU_ARGS 2>&1 | tee "$OUT/gpu_mfu_$name.log"
    local rc=${PIPESTATUS[0]}
    note "mfu $name micro-batch $mb: exit $rc"
    return "$rc"
}

# first_fit TEMPLATE CAP "MICRO_BATCHES" ARGS...: mfu runs, MB in TEMPLATE replaced by the micro-batch,
# from the first micro-batch on until one fits (exit 3, out of memory: the next; anything else stops);
# FIT and FIT_NAME then name the run that fitted (empty if none did).
first_fit() {
    local tmpl=$1 cap=$2 mbs=$3 mb rc
    shift 3
    FIT="" FIT_NAME=""
    for mb in $mbs; do
        mfu "${tmpl//MB/$mb}" "$mb" "$cap" "$@"
        rc=$?
        if [ "$rc" = 0 ]; then
            FIT=$mb FIT_NAME=${tmpl//MB/$mb}
            return 0
        fi
        [ "$rc" != 3 ] && return "$rc"
    done
    return 3
}

# plan_fit ACCUM OVERRIDES...: the largest micro-batch glm-plan puts within this GPU's memory for glm-1b
# as gpu_mfu.py builds it, ACCUM micro-batches per step; empty without a GPU (or a plan).
# GPU_CHECK_MEM_GIB overrides the device's memory (a dry run of the planner's path on a CPU).
GPU_MEM=${GPU_CHECK_MEM_GIB:-}
[ -n "$GPU_MEM" ] || GPU_MEM=$("$PY" -c 'import torch; print(f"{torch.cuda.get_device_properties(0).total_memory / 2**30 - 0.5:.1f}" if torch.cuda.is_available() else "")' 2>/dev/null)
plan_fit() {
    local accum=$1
    shift
    [ -n "$GPU_MEM" ] || return 0
    timeout -k 5 60 "$PY" -m glm_train.cli.plan model=glm-1b model.vocab_size=50304 precision=bf16 \
        parallel.zero_stage=1 train.micro_batch=1 "train.global_batch=$accum" "$@" --gpu-mem "$GPU_MEM" \
        --max-micro-batch 2>/dev/null | tee -a "$OUT/plan_fit.log" | sed -n 's/^largest micro-batch that fits [^:]*: \([0-9]*\).*/\1/p'
}
# candidates P: glm-plan's micro-batch, two less, then the fallbacks below them (all of them without P).
candidates() {
    local p=${1:-} out="" mb
    if [ -n "$p" ]; then
        out="$p"
        [ "$p" -gt 2 ] && out="$out $((p - 2))"
    fi
    for mb in $MICRO_BATCHES; do
        if [ -z "$p" ] || [ "$mb" -lt $((p - 2)) ]; then out="$out $mb"; fi
    done
    echo "$out"
}

pytest_rc=1
mb_ok=""
if [ "$env_rc" = 0 ]; then
    # The variants in order of what they decide, so that a run cut short still answers the main
    # questions. Measured on one H200 (docs/performance.md): torch.compile +10.7% tokens/s over eager,
    # split attention +5.6% over the masked kernel, fused AdamW +2.5%, micro-batch 8 -> 24 +12%
    # (compiled), dropout 0.1 -> 0 +12% (compiled).
    #   compile_accN_mbM  torch.compile, N micro-batches of M per step, M the largest glm-plan fits (the
    #                     next smaller on running out of memory), profiled: the headline MFU figure
    #   compile_mbM       the same micro-batch, one per step: what accumulation buys, side by side
    #   persample_..      the headline's run with a Part A length drawn per sample (GLM's real batches)
    #   default_accN_mbM  the defaults on a GPU (eager, split attention, fused AdamW), accumulated
    #   nodropout_..      compiled and accumulated without dropout (the preset's 0.1 costs a pass per site)
    #   wholehead_..      compiled with the whole head (train.head_chunk=0) instead of the fused one
    echo "== 2. MFU of glm-1b, bf16 ($((BUDGET_S - SECONDS)) s of budget left; GPU memory for the plan: ${GPU_MEM:-none} GiB)"
    p=$(plan_fit "$ACCUM" train.compile=true)
    echo "glm-plan: compiled, $ACCUM micro-batches a step: micro-batch ${p:-?}"
    first_fit "compile_acc${ACCUM}_mbMB" 150 "$(candidates "$p")" --compile --grad-accum "$ACCUM" \
        --profile-top 25 $ACCUM_STEPS_ARGS
    mb_ok=$FIT
    if [ -n "$mb_ok" ]; then
        cp "$OUT/gpu_mfu_$FIT_NAME.json" "$OUT/gpu_mfu.json"
        # shellcheck disable=SC2086
        mfu "compile_mb$mb_ok" "$mb_ok" 120 --compile --profile-top 25 $STEPS_ARGS
    fi

    echo "== 1. GPU tests ($((BUDGET_S - SECONDS)) s of budget left)"
    GLM_GPU_REPORT="$OUT/gpu_tests.jsonl" timeout -k 10 "$(left 200)" "$PY" -m pytest -q -m gpu tests/test_gpu.py \
        -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
    pytest_rc=${PIPESTATUS[0]}
    note "pytest: exit $pytest_rc"

    # Two parts of a block at glm-1b's shape (micro-batch 8), ours against the plain form it replaced:
    # split attention's own backward against autograd's composition; the compiled GeGLU's two
    # projections against the fused one (whose gradient concatenation Inductor makes a slow kernel).
    t=$(left 90)
    if [ "$t" -ge 45 ] && [ -n "$GPU_MEM" ]; then
        echo "== 5. block parts ($((BUDGET_S - SECONDS)) s of budget left)"
        timeout -k 10 "$t" "$PY" benchmarks/block_parts.py --batch 8 --seq 2048 --hidden 2048 --heads 32 \
            --rounds 5 --json "$OUT/block_parts.json" 2>&1 | tee "$OUT/block_parts.log"
        note "block_parts: exit ${PIPESTATUS[0]}"
    fi

    if [ -n "$mb_ok" ]; then
        # The headline's run with a Part A length drawn per sample, as GLM's real batches have: split
        # attention then makes one Part-A call per sample instead of one batched call.
        # shellcheck disable=SC2086
        mfu "persample_compile_acc${ACCUM}_mb$mb_ok" "$mb_ok" 120 --compile --grad-accum "$ACCUM" \
            --part-a per-sample $ACCUM_STEPS_ARGS
        p=$(plan_fit "$ACCUM")
        echo "glm-plan: eager, $ACCUM micro-batches a step: micro-batch ${p:-?}"
        # shellcheck disable=SC2086
        first_fit "default_acc${ACCUM}_mbMB" 120 "$(candidates "$p")" --grad-accum "$ACCUM" --profile-top 25 \
            $ACCUM_STEPS_ARGS
        # shellcheck disable=SC2086
        mfu "nodropout_compile_acc${ACCUM}_mb$mb_ok" "$mb_ok" 120 --compile --dropout 0 --grad-accum "$ACCUM" \
            $ACCUM_STEPS_ARGS
    fi

    echo "== 3. glm-plan against measured peak memory ($((BUDGET_S - SECONDS)) s of budget left)"
    t=$(left 200)
    if [ "$t" -ge 90 ]; then
        timeout -k 10 "$t" "$PY" benchmarks/plan_check.py --json "$OUT/plan_check.json" 2>&1 | tee "$OUT/plan_check.log"
        note "plan_check: exit ${PIPESTATUS[0]}"
    else
        note "plan_check: no time left"
    fi

    if [ -n "$mb_ok" ]; then
        # The whole head (all logits at once, kept for backward) against the fused one, compiled.
        p=$(plan_fit "$ACCUM" train.compile=true train.head_chunk=0)
        # shellcheck disable=SC2086
        first_fit "wholehead_compile_acc${ACCUM}_mbMB" 120 "$(candidates "$p")" --compile --head-chunk 0 \
            --grad-accum "$ACCUM" $ACCUM_STEPS_ARGS
    fi

    # The head alone at glm-1b's shape (one micro-batch of 12 scores about 12k tokens): whole, fused
    # in eager chunks, fused with the compiled chunk kernels.
    t=$(left 90)
    if [ "$t" -ge 45 ] && [ -n "$GPU_MEM" ]; then
        echo "== 4. the head alone ($((BUDGET_S - SECONDS)) s of budget left)"
        timeout -k 10 "$t" "$PY" benchmarks/head_loss.py --tokens 12288 --hidden 2048 --vocab 50432 --dtypes bf16 \
            --chunks 0,4096,4096c --json "$OUT/head_loss.json" 2>&1 | tee "$OUT/head_loss.log"
        note "head_loss: exit ${PIPESTATUS[0]}"
    fi
fi

echo "== summary (${SECONDS} s)"
"$PY" - "$OUT" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
rows = []
xml = out / "pytest.xml"
if xml.is_file():
    for case in ET.parse(xml).getroot().iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                status = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
        rows.append((case.get("name"), status, f"{float(case.get('time', 0)):.1f} s"))
else:
    rows.append(("pytest", "not run", ""))
report = out / "gpu_tests.jsonl"
measured = []
if report.is_file():
    for line in report.read_text().splitlines():
        r = json.loads(line)
        vals = {k: v for k, v in r.items() if k not in ("check", "device") and not isinstance(v, list)}
        measured.append((r["check"], ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in vals.items())))
mfu = out / "gpu_mfu.json"
w = max([len(r[0]) for r in rows] + [10])
print(f"{'test':<{w}}  result   time")
for name, status, t in rows:
    print(f"{name:<{w}}  {status:<7}  {t}")
print()
for check, vals in measured:
    print(f"{check:<18} {vals}")
print()
runs = [(p.stem.removeprefix("gpu_mfu_"), json.loads(p.read_text())) for p in sorted(out.glob("gpu_mfu_*.json"))]
ok = [(n, r) for n, r in runs if r.get("status") == "ok"]
if ok:
    r0 = ok[0][1]
    print(f"MFU glm-1b ({r0.get('device')}, torch {r0.get('torch')}): L={r0.get('layers')} d={r0.get('hidden')} "
          f"seq={r0.get('seq')} vocab={r0.get('vocab')} params={r0.get('parameters', 0) / 1e9:.3f}B, "
          f"{r0.get('precision')}, dropout {r0.get('dropout')}, no recomputation; "
          f"{r0.get('model_gflops_per_token', 0):.3f} model GFLOP/token")
    top = max(r["peak_tflops_measured"] for _, r in ok)
    hdr = (f"{'variant':<30} {'mb x acc':>8} {'attention':>9} {'drop':>4} {'compile':>7} {'head':>5} {'AdamW':>6} "
           f"{'step s':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'peak':>5} {'MFU':>6} {'MFU max':>7} {'MFU ds':>6} "
           f"{'mem GiB':>7} {'resv':>5}  loss first -> last")
    print(hdr)
    for n, r in ok:
        kernel = r.get("attention_kernel", r["attention_impl"])
        batch = f"{r['micro_batch']} x {r.get('grad_accum', 1)}"
        print(f"{n:<30} {batch:>8} {kernel:>9} {r['dropout']:>4} {str(r.get('compile')):>7} "
              f"{r.get('head_chunk', 0):>5} "
              f"{r.get('adamw', r.get('optimizer_impl', 'auto')):>6} {r['step_time_mean_s']:>7.4f} "
              f"{r['tokens_per_s']:>9.0f} {r['model_tflops']:>8.1f} {r['peak_tflops_measured']:>5.0f} "
              f"{r['mfu_vs_measured_peak']:>6.1%} {r['model_tflops'] / top:>7.1%} "
              f"{(r['mfu_vs_datasheet'] or 0):>6.1%} {r.get('peak_memory_allocated_gib', 0):>7.1f} "
              f"{r.get('peak_memory_reserved_gib') or 0:>5.1f}  "
              f"{r['first_loss']:.6g} -> {r['last_loss']:.6g}")
    print("(mb x acc: micro-batch x micro-batches per optimizer step; mem GiB / resv: CUDA's peak allocated / "
          "reserved memory)")
    print(f"(MFU: model FLOPs per second over the bf16 matmul peak measured in the same process, which "
          f"varies by a few percent from process to process; MFU max: over the highest of them, {top:.0f} "
          f"TFLOP/s; MFU ds: over the datasheet's dense figure)")
    if mfu.is_file():
        h = json.loads(mfu.read_text())
        resv = h.get("peak_memory_reserved_gib")
        mem = "" if resv is None else (f"; {h.get('peak_memory_allocated_gib', 0):.1f} GiB allocated, {resv:.1f} "
                                       f"reserved of {h.get('device_memory_gib', 0):.1f} "
                                       f"(allocator {h.get('alloc_conf')})")
        print(f"headline (compiled, micro-batch {h['micro_batch']} x {h.get('grad_accum', 1)} a step): "
              f"{h['tokens_per_s']:.0f} tokens/s, {h['model_tflops']:.1f} TFLOP/s, MFU "
              f"{h['mfu_vs_measured_peak']:.1%} of this process's measured peak, {h['model_tflops'] / top:.1%} "
              f"of the highest, {h['mfu_vs_datasheet'] or 0:.1%} of the datasheet{mem}")
        idle = (h.get("profile") or {}).get("idle")
        if idle:  # the profiled step: device time lost waiting for the host, by pipeline instruction
            where = ", ".join(f"{r['name']} {r['idle_ms']:.1f} ms ({r['syncs']} syncs)"
                              for r in idle["by_range"] if r["idle_ms"] >= 0.5)
            step_ms = h["step_time_mean_s"] * 1e3
            print(f"headline's profiled step: device idle {idle['idle_ms']:.1f} of {idle['window_ms']:.1f} ms "
                  f"({idle['idle_ms'] / idle['window_ms']:.1%}, profiler on): {where}; unprofiled, its "
                  f"{idle['busy_ms']:.1f} ms of kernels leave {step_ms - idle['busy_ms']:.1f} ms of a "
                  f"{step_ms:.1f} ms step idle")
        one = [r for n, r in ok if n == f"compile_mb{h['micro_batch']}"]
        if one:
            print(f"the same micro-batch, one a step: {one[0]['tokens_per_s']:.0f} tokens/s "
                  f"({h['tokens_per_s'] / one[0]['tokens_per_s'] - 1:+.1%} tokens/s from accumulation)")
        # The issue's target: 50% MFU of a ~1B GLM at sequence 2048 in bf16 on one H100 (within its memory).
        # Judged on the preset's dropout (GLM-130B's 0.1); runs without dropout are shown above.
        preset = [(n, r) for n, r in ok if r["dropout"] == h["dropout"]]
        best_n, best = max(preset, key=lambda nr: nr[1]["mfu_vs_measured_peak"])
        print(f"target >= 50% MFU (measured peak, dropout {h['dropout']}) on {h.get('device')}: "
              f"{'MET' if best['mfu_vs_measured_peak'] >= 0.5 else 'not met'} "
              f"(best: {best_n}, {best['mfu_vs_measured_peak']:.1%}; {best['mfu_vs_datasheet'] or 0:.1%} "
              f"of the datasheet)")
parts = out / "block_parts.json"
if parts.is_file():
    print()
    print("block parts at glm-1b's shape, forward + backward (ours / the form it replaced):")
    for r in json.loads(parts.read_text()):
        print(f"  {r['part']:<17} {r['case']:<26} {r['variant']:<16} {r['median_s'] * 1e3:8.2f} ms  {r['vs_first']:.3f}")
for n, r in runs:
    if r.get("status") != "ok":
        print(f"MFU {n}: {r.get('status')} at micro-batch {r.get('micro_batch')}: {str(r.get('error'))[:300]}")
if not ok:
    print("MFU: no successful run")
status = out / "status.txt"
if status.is_file():
    print()
    print(status.read_text().strip())
EOF
# Exit 0 only when the imports worked, every GPU test passed and an MFU figure came out.
[ "$env_rc" = 0 ] && [ "$pytest_rc" = 0 ] && [ -f "$OUT/gpu_mfu.json" ]
