"""End-to-end training through the real CLI, DeepSpeed engine and files (one process, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_same_curve, data_overrides

pytestmark = pytest.mark.slow

COMMON = ["model=tiny", "train.iters=20", "train.micro_batch=4", "train.global_batch=8", "train.lr=3e-3",
          "train.warmup_iters=2", "checkpoint.every=5", "eval.every=10", "eval.max_samples=8",
          "model.dropout=0.1", "train.progress=false"]


def _run(module: str, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{module} {args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _train(tiny_data, run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("glm_train.cli.train", [*data_overrides(tiny_data), *COMMON, f"run.dir={run_dir}", *extra], check)


def _steps(run_dir: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "full"
    _train(tiny_data, run_dir)
    return run_dir


def test_loss_falls_and_outputs_are_written(full_run):
    steps = _steps(full_run)
    assert [r["step"] for r in steps] == list(range(1, 21))
    for key in ("step", "loss", "lr", "grad_norm", "consumed_samples", "tokens_per_s", "elapsed_s"):
        assert all(key in r for r in steps), key
    assert steps[-1]["consumed_samples"] == 160
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.5, (first, last)
    evals = [json.loads(ln) for ln in (full_run / "metrics.jsonl").read_text().splitlines() if "val_loss_en" in ln]
    assert [e["step"] for e in evals] == [0, 10, 20]
    assert evals[-1]["val_loss_en"] < evals[0]["val_loss_en"] and evals[-1]["val_loss_zh"] < evals[0]["val_loss_zh"]
    assert (full_run / "config.yaml").is_file() and (full_run / "loss.png").stat().st_size > 1000
    assert (full_run / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    kept = sorted(p.name for p in (full_run / "checkpoints").glob("step_*"))
    assert kept == ["step_0000010", "step_0000015", "step_0000020"]  # checkpoint.keep_last=3


def test_stop_and_resume_gives_identical_losses(tiny_data, full_run, tmp_path):
    run_dir = tmp_path / "resumed"
    first = _train(tiny_data, run_dir, "train.exit_at_step=10")
    assert "stopping at step 10" in first.stdout + first.stderr
    assert [r["step"] for r in _steps(run_dir)] == list(range(1, 11))
    second = _train(tiny_data, run_dir)
    assert "resumed from step 10" in second.stdout + second.stderr
    a, b = _steps(full_run), _steps(run_dir)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert_same_curve(a, b)  # bitwise, dropout included (see its ulp note)
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


def test_resume_refuses_a_different_model(tiny_data, full_run, tmp_path):
    run_dir = tmp_path / "refuse"
    _train(tiny_data, run_dir, "train.exit_at_step=5")
    r = _train(tiny_data, run_dir, "model.layers=3", check=False)
    assert r.returncode != 0 and "model config differs" in r.stderr


def test_generate_from_run_dir(full_run):
    r = _run("glm_train.cli.generate", [f"checkpoint={full_run}", "prompt=the lord",
                                        "sampling.max_new_tokens=8"])
    assert r.stdout.startswith("the lord")
    r = _run("glm_train.cli.generate", [f"checkpoint={full_run}", "prompt=却说", "sampling.temperature=0"])
    assert r.stdout.startswith("却说")
    r = _run("glm_train.cli.generate", ["checkpoint=/nonexistent", "prompt=x"], check=False)
    assert r.returncode == 1 and "/nonexistent" in r.stderr


def test_bf16_trains_with_wandb_offline(tiny_data, tmp_path):
    run_dir = tmp_path / "bf16"
    _train(tiny_data, run_dir, "precision=bf16", "train.iters=12", "eval.every=6", "run.wandb=true")
    steps = _steps(run_dir)
    assert len(steps) == 12
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in steps)
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb should log offline into the run dir"


def test_plain_model_from_checkpoint_reproduces_validation_loss(full_run):
    # The DeepSpeed pipeline (head inside the loss, Part-B positions only) and the plain GLMModel
    # loaded from its checkpoint without DeepSpeed must agree on the final validation loss.
    import torch

    from glm_train.data.dataset import ValidationSet, collate
    from glm_train.data.indexed import IndexedDataset
    from glm_train.infer.loading import load_trained
    from glm_train.train.loss import masked_token_losses
    from glm_train.train.trainer import special_ids

    model, tok, cfg = load_trained(full_run)
    final = [json.loads(ln) for ln in (full_run / "metrics.jsonl").read_text().splitlines() if "val_loss_en" in ln][-1]
    for name, prefix in cfg.data.valid.items():
        vs = ValidationSet(IndexedDataset(prefix), special_ids(tok), cfg.model.seq_length, cfg.eval.gmask_ratio,
                           cfg.eval.max_samples)
        b = collate(vs.samples)
        with torch.no_grad():
            logits = model(b["input_ids"], b["position_ids"], b["prefix_lengths"])
        losses = masked_token_losses(logits, b["targets"])
        val = float((losses * b["loss_mask"]).sum() / b["loss_mask"].sum())
        assert abs(val - final[f"val_loss_{name}"]) < 1e-4, (name, val, final)


def test_min_new_tokens_defers_the_stop(full_run):
    from glm_train.infer.generate import SamplingConfig, generate
    from glm_train.infer.loading import load_trained

    model, tok, _ = load_trained(full_run)
    text = generate(model, tok, "the lord", SamplingConfig(max_new_tokens=12, min_new_tokens=12, seed=3))
    assert len(tok.encode(text)) >= 10  # 12 sampled ids; re-encoding may merge a few pieces


def test_instruction_timers_account_for_the_step_and_change_nothing(tiny_data, tmp_path, full_run):
    # run.timers: each step's time per pipeline instruction, from the same training (bitwise the same
    # losses as the untimed run's first steps).
    run_dir = tmp_path / "timed"
    _train(tiny_data, run_dir, "run.timers=true", "train.exit_at_step=4")
    timed, plain = _steps(run_dir), _steps(full_run)[:4]
    assert [r["loss"] for r in timed] == [r["loss"] for r in plain]
    assert not any(k.startswith("time_") for k in plain[0])
    for r in timed:
        t = {k: v for k, v in r.items() if k.startswith("time_")}
        assert set(t) == {"time_load_s", "time_forward_s", "time_backward_s", "time_reduce_tied_grads_s",
                          "time_reduce_grads_s", "time_optimizer_s"}, t
        assert all(v > 0 for v in t.values())
        # On a CPU the instructions run synchronously: they make up the step, less the building of the
        # first micro-batch and the engine's bookkeeping between them.
        assert 0.7 * r["step_time_s"] < sum(t.values()) <= r["step_time_s"], (t, r["step_time_s"])
        assert t["time_forward_s"] + t["time_backward_s"] > 0.5 * r["step_time_s"]
