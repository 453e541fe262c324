#!/usr/bin/env bash
# One-shot check of the GPU path on a single-GPU machine whose Python has torch (CUDA) but not
# DeepSpeed/Hydra/pydantic and no package index: everything else comes from .gpudeps/, filled
# beforehand on a machine with this project's .venv by `bash benchmarks/gpu_deps.sh`.
#
#     bash benchmarks/gpu_check.sh           (from the repository root, or anywhere)
#
# Sections, each under `timeout`, all within about 7 minutes:
#   0. environment: nvidia-smi -L, versions, `import deepspeed, hydra, omegaconf, glm_train`
#   1. python3 -m pytest -q -m gpu tests/test_gpu.py   (forward bf16/fp32 vs CPU, SDPA vs eager,
#      bf16 ZeRO-1 training + checkpoint + resume, fp32 GPU vs CPU training)
#   2. python3 benchmarks/gpu_mfu.py: MFU of the ~1B GLM (configs/model/glm-1b.yaml) in bf16,
#      micro-batch 8, then 4, 2, 1 after an out-of-memory; then the same with split attention
#   3. python3 benchmarks/plan_check.py: glm-plan's memory estimate against measured peaks
# Logs and JSON go to $OUT (default /tmp/gpu_out); a summary table is printed at the end.
# Dry run without a GPU: PYTHON=.venv/bin/python GLM_GPU_TESTS_ON_CPU=1 GPU_MFU_MICRO_BATCHES=2 \
#   GPU_MFU_ARGS="--device cpu --layers 2 --hidden 128 --heads 4 --seq 128 --steps 3 --warmup 1" \
#   bash benchmarks/gpu_check.sh
set -u

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-460}"   # all sections together; the caller's limit is about 8 minutes
MICRO_BATCHES="${GPU_MFU_MICRO_BATCHES:-8 4 2 1}"
MFU_ARGS="${GPU_MFU_ARGS:-}"            # e.g. "--device cpu --layers 2 --hidden 128 ..." for a dry run
export PYTHONPATH="$PWD/.gpudeps/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning,ignore::FutureWarning}"
unset DS_ACCELERATOR
rm -f "$OUT"/gpu_tests.jsonl "$OUT"/gpu_mfu*.json "$OUT"/pytest.xml "$OUT"/status.txt

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

pytest_rc=1
if [ "$env_rc" = 0 ]; then
    echo "== 1. GPU tests ($((BUDGET_S - SECONDS)) s of budget left)"
    GLM_GPU_REPORT="$OUT/gpu_tests.jsonl" timeout -k 10 "$(left 240)" "$PY" -m pytest -q -m gpu tests/test_gpu.py \
        -rs -p no:cacheprovider --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
    pytest_rc=${PIPESTATUS[0]}
    note "pytest: exit $pytest_rc"

    echo "== 2. MFU of glm-1b, bf16 ($((BUDGET_S - SECONDS)) s of budget left)"
    for mb in $MICRO_BATCHES; do
        t=$(left 200)
        if [ "$t" -lt 45 ]; then
            note "mfu: no time left for micro-batch $mb"
            break
        fi
        # shellcheck disable=SC2086
        timeout -k 10 "$t" "$PY" benchmarks/gpu_mfu.py --micro-batch "$mb" --json "$OUT/gpu_mfu_mb$mb.json" \
            $MFU_ARGS 2>&1 | tee "$OUT/gpu_mfu_mb$mb.log"
        rc=${PIPESTATUS[0]}
        note "mfu micro-batch $mb: exit $rc"
        if [ "$rc" = 0 ]; then
            cp "$OUT/gpu_mfu_mb$mb.json" "$OUT/gpu_mfu.json"
            break
        elif [ "$rc" != 3 ]; then  # 3: out of memory, retry smaller; anything else: stop
            break
        fi
    done

    # The same run with the mask-free split attention (FlashAttention-eligible), at the micro-batch
    # that fitted: the side-by-side figure that decides the GPU default.
    if [ -f "$OUT/gpu_mfu.json" ]; then
        mb_ok=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['micro_batch'])" "$OUT/gpu_mfu.json")
        t=$(left 200)
        if [ "$t" -ge 60 ]; then
            # shellcheck disable=SC2086
            timeout -k 10 "$t" "$PY" benchmarks/gpu_mfu.py --micro-batch "$mb_ok" --attention-impl split \
                --json "$OUT/gpu_mfu_split.json" $MFU_ARGS 2>&1 | tee "$OUT/gpu_mfu_split.log"
            note "mfu split attention, micro-batch $mb_ok: exit ${PIPESTATUS[0]}"
        else
            note "mfu split attention: no time left"
        fi
    fi

    echo "== 3. glm-plan against measured peak memory ($((BUDGET_S - SECONDS)) s of budget left)"
    t=$(left 240)
    if [ "$t" -ge 60 ]; then
        timeout -k 10 "$t" "$PY" benchmarks/plan_check.py --json "$OUT/plan_check.json" 2>&1 | tee "$OUT/plan_check.log"
        note "plan_check: exit ${PIPESTATUS[0]}"
    else
        note "plan_check: no time left"
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
if mfu.is_file():
    r = json.loads(mfu.read_text())
    def f(key, fmt="{:.3g}"):
        v = r.get(key)
        return "-" if v is None else fmt.format(v)
    print(f"MFU glm-1b ({r.get('device')}): L={r.get('layers')} d={r.get('hidden')} seq={r.get('seq')} "
          f"vocab={r.get('vocab')} params={r.get('parameters', 0) / 1e9:.3f}B micro-batch={r.get('micro_batch')} "
          f"{r.get('precision')} ckpt-interval={r.get('activation_checkpoint_interval')}")
    print(f"  tokens/s {f('tokens_per_s', '{:.0f}')} | step {f('step_time_mean_s')} s | model TFLOP/s "
          f"{f('model_tflops', '{:.1f}')} | peak measured {f('peak_tflops_measured', '{:.1f}')} | datasheet "
          f"{f('peak_tflops_datasheet', '{:.0f}')}")
    print(f"  MFU vs measured peak {f('mfu_vs_measured_peak', '{:.1%}')} | MFU vs datasheet "
          f"{f('mfu_vs_datasheet', '{:.1%}')} | peak memory {f('peak_memory_allocated_gib', '{:.1f}')} GiB "
          f"of {f('device_memory_gib', '{:.0f}')} | GFLOP/token {f('model_gflops_per_token', '{:.3f}')}")
    split = out / "gpu_mfu_split.json"
    if split.is_file():
        r2 = json.loads(split.read_text())
        print(f"  split attention: tokens/s {r2.get('tokens_per_s', 0):.0f} | MFU vs measured peak "
              f"{r2.get('mfu_vs_measured_peak', 0):.1%} | vs datasheet {r2.get('mfu_vs_datasheet', 0):.1%} | "
              f"peak memory {r2.get('peak_memory_allocated_gib', 0):.1f} GiB")
else:
    tried = sorted(out.glob("gpu_mfu_mb*.json"))
    print("MFU: no successful run;", "; ".join(f"{p.name}: {json.loads(p.read_text()).get('status')}" for p in tried))
status = out / "status.txt"
if status.is_file():
    print()
    print(status.read_text().strip())
EOF
# Exit 0 only when the imports worked, every GPU test passed and an MFU figure came out.
[ "$env_rc" = 0 ] && [ "$pytest_rc" = 0 ] && [ -f "$OUT/gpu_mfu.json" ]
