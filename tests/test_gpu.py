"""GPU checks (``pytest -m gpu tests/test_gpu.py``), skipped where torch sees no CUDA device.

Each compares the GPU against an independent reference: the fp32 CPU forward, the eager attention
path, an uninterrupted run, the same run on the CPU. ``GLM_GPU_TESTS_ON_CPU=1`` runs the same code
with the "GPU" side on the CPU (to check the tests themselves on a machine without a GPU).
``GLM_GPU_REPORT=FILE`` appends the measured differences as JSON lines (benchmarks/gpu_check.sh).

Tolerances:
- bf16 GPU forward vs fp32 CPU forward: relative L2 error of the logits <= 2e-2. bf16 keeps 8
  significant bits (unit roundoff 2^-9 = 2e-3) and the 4-layer model rounds its activations a few
  dozen times; the same comparison with bf16 on the CPU measures 7e-3. A wrong mask, position or
  kernel gives errors of order 1.
- fp32 on the GPU (TF32 off, the default that neither our code nor DeepSpeed changes) vs fp32 CPU,
  and SDPA or split vs eager in fp32 on the GPU: <= 1e-4 (the CPU pair measures 2e-7; TF32's 10-bit
  mantissa would give about 1e-3). SDPA or split vs eager in bf16, outputs and parameter gradients: <= 2e-2
  (the CPU pair measures 2.7e-3 and 3.6e-3).
- Resume vs uninterrupted in bf16 (dropout on): per-step losses within 1e-4 relative. CUDA
  kernels (SDPA's memory-efficient backward) need not be bitwise reproducible; their fp32-level
  differences in gradients move a bf16 tiny model's loss by far less, and the first 10 steps of the
  two runs (no resume involved) are compared with the same bound to show that floor. A resume that
  loses the dropout RNG stream moves the losses by 1e-4 to 1.6e-3 (measured on the CPU), a lost
  optimizer state by much more.
- fp32 training on the GPU vs the CPU: per-step losses within 1e-4 relative over 10 steps,
  gradient norms within 1e-3 (a norm is a sum of squares, more sensitive to rounding).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, data_overrides

ON_CPU = os.environ.get("GLM_GPU_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CPU or torch.cuda.is_available()), reason="needs a CUDA GPU"),
]

V, B, S = 512, 4, 128


def _report(name: str, **values) -> None:
    path = os.environ.get("GLM_GPU_REPORT")
    print(f"{name}: {values}")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": name, "device": DEVICE, **values}) + "\n")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against the reference b."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def _model(impl: str):
    from glm_train.config import ModelConfig
    from glm_train.model import GLMModel

    cfg = ModelConfig(vocab_size=V, layers=4, hidden=128, heads=4, seq_length=S, attention_impl=impl)
    return GLMModel(cfg, seed=3).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    targets = torch.randint(0, V, (B, S), generator=g)
    prefix = torch.tensor([10, 64, 100, 0])  # 0: a fully causal sample
    return ids, targets, prefix


def _forward(model, ids, prefix, device, dtype):
    m = copy.deepcopy(model).to(device=device, dtype=dtype)
    with torch.no_grad():
        return m(ids.to(device), prefix_lengths=prefix.to(device)).float().cpu()


def test_tf32_is_off():
    # Our code never touches TF32; torch's default is off for matmuls. An override variable would
    # turn it on behind everyone's back and make the fp32 comparisons below meaningless.
    assert os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0") in ("", "0")
    import glm_train.train.flops  # noqa: F401 - importing our modules changes nothing either

    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    _report(
        "tf32",
        allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )


@pytest.mark.parametrize("impl", ["sdpa", "eager", "split"])
def test_forward_on_gpu_matches_fp32_cpu(impl):
    from glm_train.train.loss import masked_token_losses

    model = _model(impl)
    ids, targets, prefix = _inputs()
    ref = _forward(model, ids, prefix, "cpu", torch.float32)
    fp32 = _forward(model, ids, prefix, DEVICE, torch.float32)
    bf16 = _forward(model, ids, prefix, DEVICE, torch.bfloat16)
    loss_ref = float(masked_token_losses(ref, targets).mean())
    loss_bf16 = float(masked_token_losses(bf16, targets).mean())
    errs = {
        "fp32_rel_l2": _rel(fp32, ref),
        "bf16_rel_l2": _rel(bf16, ref),
        "bf16_loss_rel": abs(loss_bf16 - loss_ref) / loss_ref,
    }
    _report(f"forward_{impl}", **errs)
    assert errs["fp32_rel_l2"] <= 1e-4, errs
    assert errs["bf16_rel_l2"] <= 2e-2, errs
    assert errs["bf16_loss_rel"] <= 1e-3, errs
    # Not vacuous: a different input gives a different answer at these tolerances.
    other = _forward(model, ids.roll(1, dims=1), prefix, "cpu", torch.float32)
    assert _rel(other, ref) > 0.1


@pytest.mark.parametrize("impl", ["sdpa", "split", "split_one_length"])
def test_fused_kernels_match_eager_on_gpu(impl):
    # split_one_length: every sample's Part A of one length, which split takes in one batched call.
    one_length = impl == "split_one_length"
    impl = impl.removesuffix("_one_length")
    fused, eager = _model(impl), _model("eager")
    ids, targets, prefix = _inputs()
    if one_length:
        prefix = torch.full_like(prefix, 64)
    errs = {}
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        outs, grads = [], []
        for model in (fused, eager):
            m = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
            logits = m(ids.to(DEVICE), prefix_lengths=prefix.to(DEVICE))
            logits.float().square().mean().backward()
            outs.append(logits.float().cpu())
            grads.append(torch.cat([p.grad.float().flatten().cpu() for p in m.parameters()]))
        errs[f"{name}_out_rel_l2"] = _rel(outs[0], outs[1])
        errs[f"{name}_grad_rel_l2"] = _rel(grads[0], grads[1])
    _report(f"{impl}{'_one_length' if one_length else ''}_vs_eager", **errs)
    assert errs["fp32_out_rel_l2"] <= 1e-4 and errs["fp32_grad_rel_l2"] <= 1e-4, errs
    assert errs["bf16_out_rel_l2"] <= 2e-2 and errs["bf16_grad_rel_l2"] <= 2e-2, errs


def test_fused_head_on_gpu_matches_the_whole_head():
    """The fused, chunked head + loss (train.head_chunk) on the GPU against the whole head on the GPU,
    both measured against the CPU's whole head from FP64 inputs (its softmax in FP32: a reference to
    about 1e-7): FP32 equal to rounding, bf16 within 1.5x the whole head's error, and bf16 through
    the compiled chunk kernels (train.compile) as close as the eager chunks."""
    from glm_train.model.embedding import GLMEmbedding
    from glm_train.train.loss import GLMHeadLoss

    g = torch.Generator().manual_seed(0)
    n, d, vocab = 2048, 256, 8192
    hidden64 = torch.randn(1, n, d, generator=g, dtype=torch.float64)
    weight64 = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.2
    targets = torch.randint(0, vocab, (1, n), generator=g)
    mask = (torch.rand(1, n, generator=g) < 0.5).float()

    def run(device: str, dtype: torch.dtype, chunk: int, compiled: bool = False) -> list[torch.Tensor]:
        head = GLMEmbedding(vocab, d, std=1.0, seed=0).to(device=device, dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(weight64)
        fn = GLMHeadLoss(head)
        fn.head_chunk, fn.z_loss, fn.compiled = chunk, 1e-3, compiled
        h = hidden64.to(device=device, dtype=dtype, copy=True).requires_grad_()
        loss = fn(h, (targets.to(device), mask.to(device)))
        loss.backward()
        return [t.detach().double().cpu() for t in (loss, h.grad, head.weight.grad)]

    exact = run("cpu", torch.float64, 0)
    errs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        whole, fused = run(DEVICE, dtype, 0), run(DEVICE, dtype, 512)
        for part, a, b, e in zip(("loss", "dh", "dw"), fused, whole, exact, strict=True):
            errs[f"{name}_{part}_fused"], errs[f"{name}_{part}_whole"] = _rel(a, e), _rel(b, e)
    compiled = run(DEVICE, torch.bfloat16, 512, compiled=True)
    for part, a, e in zip(("loss", "dh", "dw"), compiled, exact, strict=True):
        errs[f"bf16_{part}_compiled"] = _rel(a, e)
    _report("fused_head", **errs)
    for part in ("loss", "dh", "dw"):
        assert errs[f"fp32_{part}_fused"] <= 1e-5, errs
        assert errs[f"bf16_{part}_fused"] <= 1.5 * errs[f"bf16_{part}_whole"] + 1e-6, errs
        assert errs[f"bf16_{part}_compiled"] <= 1.2 * errs[f"bf16_{part}_fused"] + 1e-6, errs


# ---------------------------------------------------------------------- training through the CLI
TRAIN = [
    "model=tiny",
    "train.micro_batch=4",
    "train.global_batch=8",
    "train.lr=3e-3",
    "train.warmup_iters=2",
    "eval.every=0",
    "train.progress=false",
    "checkpoint.every=5",
    "parallel.zero_stage=1",
]


def _env(device: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("DS_ACCELERATOR", None)  # conftest sets cpu for the CPU suite; glm_train.env decides here
    if device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def _start(tiny_data, run_dir: Path, device: str, *extra: str) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "glm_train.cli.train",
        *data_overrides(tiny_data),
        *TRAIN,
        f"run.dir={run_dir}",
        *extra,
    ]
    return subprocess.Popen(
        args, cwd=REPO, env=_env(device), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{out[-4000:]}")
    return out


def _steps(run_dir: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_bf16_training_resumes_with_the_same_losses(tiny_data, tmp_path, compiled):
    """Stop at step 10 and resume: steps 11-20 as in the uninterrupted run. Compiled too: Inductor
    draws its dropout masks from the generator state that the checkpoint restores. On one H200 the
    eager runs were bitwise equal; two compiled runs drifted apart from step 3 by up to 5e-5 in
    the loss, steps 1-10 as much as 11-20 (Inductor's deterministic mode did not change it), so
    the bound is the run-to-run floor, not bitwise (on a CPU compiled runs are bitwise)."""
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    common = ["precision=bf16", "train.iters=20", "model.dropout=0.1", "model.attention_dropout=0.1",
              f"train.compile={str(compiled).lower()}"]
    # The uninterrupted run and the first half of the interrupted one share the GPU. The eager
    # uninterrupted run also times its instructions (run.timers: device synchronizations), which
    # must change no loss.
    full = _start(tiny_data, full_dir, DEVICE, *common, *([] if compiled else ["run.timers=true"]))
    first = _start(tiny_data, split_dir, DEVICE, *common, "train.exit_at_step=10")
    _finish(full)
    out1 = _finish(first)
    assert "stopping at step 10" in out1
    out2 = _finish(_start(tiny_data, split_dir, DEVICE, *common))
    assert "resumed from step 10" in out2

    a, b = _steps(full_dir), _steps(split_dir)
    assert [r["step"] for r in a] == list(range(1, 21)) and [r["step"] for r in b] == list(range(1, 21))
    la, lb = [r["loss"] for r in a], [r["loss"] for r in b]
    assert all(math.isfinite(x) for x in la + lb), la
    first3, last3 = sum(la[:3]) / 3, sum(la[-3:]) / 3
    assert last3 < first3 - 0.3, la
    ckpt = full_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_0000020"
    assert any(f.stat().st_size > 0 for f in (ckpt / "step_0000020").rglob("*.pt"))
    before, after = _max_rel(lb[:10], la[:10]), _max_rel(lb[10:], la[10:])
    _report(
        "bf16_resume_compile" if compiled else "bf16_resume",
        max_rel_steps_1_10=before,
        max_rel_steps_11_20=after,
        losses_full=la,
        losses_resumed=lb,
        first3=first3,
        last3=last3,
    )
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    if not compiled:
        assert all(r["time_forward_s"] > 0 and r["time_optimizer_s"] > 0 for r in a), a[0]
    assert before <= 1e-4, (la, lb)  # same seed, same GPU: the run-to-run floor
    assert after <= 1e-4, (la, lb)


def test_fp32_training_on_gpu_matches_cpu(tiny_data, tmp_path):
    common = ["precision=fp32", "train.iters=10", "model.dropout=0.0", "model.attention_dropout=0.0"]
    gpu = _start(tiny_data, tmp_path / "gpu", DEVICE, *common)
    cpu = _start(tiny_data, tmp_path / "cpu", "cpu", *common)
    _finish(gpu)
    _finish(cpu)
    g, c = _steps(tmp_path / "gpu"), _steps(tmp_path / "cpu")
    assert [r["step"] for r in g] == [r["step"] for r in c] == list(range(1, 11))
    lg, lc = [r["loss"] for r in g], [r["loss"] for r in c]
    ng, nc = [r["grad_norm"] for r in g], [r["grad_norm"] for r in c]
    errs = {"loss_max_rel": _max_rel(lg, lc), "grad_norm_max_rel": _max_rel(ng, nc)}
    _report("fp32_gpu_vs_cpu", **errs, losses_gpu=lg, losses_cpu=lc)
    assert all(math.isfinite(x) for x in lg), lg
    assert errs["loss_max_rel"] <= 1e-4, (lg, lc)
    assert errs["grad_norm_max_rel"] <= 1e-3, (ng, nc)
    assert lg[-1] < lg[0], lg  # it trains
