"""Checkpoints: crash-exact resume (SIGKILL anywhere, a save included), retention, manifest, export of any
layout, load_model, and clear errors on damaged input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glm_train.train.checkpoint import KILL_IN_SAVE_ENV
from tests.conftest import REPO, assert_same_curve, data_overrides

pytestmark = pytest.mark.slow

KILL = ["model=tiny", "train.iters=24", "train.micro_batch=4", "train.global_batch=8", "train.lr=3e-3",
        "train.warmup_iters=2", "checkpoint.every=4", "checkpoint.keep_last=2", "checkpoint.keep_every=8",
        "eval.every=0", "model.dropout=0.1", "model.attention_dropout=0.1", "train.progress=false"]


def _cmd(tiny_data, run_dir: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "glm_train.cli.train", *data_overrides(tiny_data), *args, f"run.dir={run_dir}"]


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", **extra)


def _records(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []


def _run_and_kill_at(tiny_data, run_dir: Path, step: int) -> None:
    """Start training and SIGKILL it as soon as metrics.jsonl shows ``step`` (a random moment of a step)."""
    proc = subprocess.Popen(_cmd(tiny_data, run_dir, KILL), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            recs = _records(run_dir)
            if recs and recs[-1].get("step", 0) >= step:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _assert_latest_complete(run_dir: Path) -> str | None:
    ck = run_dir / "checkpoints"
    if not (ck / "latest").is_file():  # killed before the first save completed
        assert not [p for p in ck.glob("step_*") if not p.name.endswith(".tmp")] if ck.is_dir() else True
        return None
    tag = (ck / "latest").read_text().strip()
    assert not tag.endswith(".tmp"), tag
    folder = ck / tag
    names = {p.name for p in folder.iterdir()}
    assert "rank_state_00000.pt" in names and "mp_rank_00_model_states.pt" in names, names
    assert any(n.startswith("layer_") for n in names)
    return tag


def test_sigkill_anywhere_then_resume_gives_identical_losses(tiny_data, tmp_path):
    full_dir = tmp_path / "full"
    r = subprocess.run(_cmd(tiny_data, full_dir, KILL), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    full = [x for x in _records(full_dir) if "loss" in x]
    rng = random.Random(2026)
    first_kill = rng.randint(2, 9)
    save_kill = rng.choice([s for s in (8, 12, 16) if s > first_kill + 1])
    last_kill = rng.randint(save_kill + 2, 22)
    run = tmp_path / "killed"

    _run_and_kill_at(tiny_data, run, first_kill)
    first_latest = _assert_latest_complete(run)

    # Killed in the middle of saving step `save_kill`: files written under the temporary name only.
    r = subprocess.run(_cmd(tiny_data, run, KILL), cwd=REPO, env=_env(**{KILL_IN_SAVE_ENV: str(save_kill)}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert (run / "checkpoints" / f"step_{save_kill:07d}.tmp").is_dir()
    assert _assert_latest_complete(run) == f"step_{save_kill - 4:07d}"

    _run_and_kill_at(tiny_data, run, last_kill)
    _assert_latest_complete(run)
    r = subprocess.run(_cmd(tiny_data, run, KILL), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    got = [x for x in _records(run) if "loss" in x]
    assert [x["step"] for x in got] == list(range(1, 25))
    assert_same_curve(full, got)
    # Retention: the last 2 plus the milestones (multiples of 8); no temporary folder left.
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000008", "step_0000016", "step_0000020", "step_0000024"], kept
    # The manifest records the start and each resume.
    history = json.loads((run / "manifest.json").read_text())["history"]
    second = "resume" if first_latest else "start"  # killed before the first save: starts again
    assert [h["event"] for h in history] == ["start", second, "resume", "resume"]
    assert [h["step"] for h in history[1:]] == sorted(h["step"] for h in history[1:])


# ------------------------------------------------------------------ export and load_model from tp=2 x pp=2

BASE = ["model=tiny", "model.layers=4", "train.iters=8", "train.micro_batch=2", "train.global_batch=8",
        "train.lr=3e-3", "train.warmup_iters=1", "eval.every=8", "eval.max_samples=8", "checkpoint.every=4",
        "train.progress=false"]
TP2PP2 = [*BASE, "parallel.tp=2", "parallel.pp=2"]


def _launch(tiny_data, run_dir: Path, nproc: int, args: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "glm_train.cli.train", *data_overrides(tiny_data), *args, f"run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return [x for x in _records(run_dir) if "loss" in x]


@pytest.fixture(scope="module")
def tp2pp2_run(tiny_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2pp2") / "run"
    _launch(tiny_data, run_dir, 4, TP2PP2)
    return run_dir


def _reshard(src: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_train.cli.reshard", "--input", str(src), "--output", str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("src_layout,dst_layout", [((2, 2), (1, 1)), ((1, 1), (2, 1))])
def test_resharded_checkpoint_continues_the_curve(tiny_data, tp2pp2_run, tmp_path, src_layout, dst_layout):
    """Step 4 of a (tp, pp) run, resharded and resumed in another layout: steps 5-8 as the original
    (fp32: within 1e-5 relative; measured here: bitwise equal)."""
    if src_layout == (2, 2):
        src, original = tp2pp2_run, [x for x in _records(tp2pp2_run) if "loss" in x]
    else:
        src = tmp_path / "src"
        original = _launch(tiny_data, src, 1, BASE)
    free = tmp_path / "layout_free"
    r = _reshard(src / "checkpoints" / "step_0000004", free)
    assert r.returncode == 0, r.stderr
    tp, pp = dst_layout
    got = _launch(tiny_data, tmp_path / "dst", tp * pp, [*BASE, f"parallel.tp={tp}", f"parallel.pp={pp}",
                                                          f"checkpoint.load={free}"])
    assert [x["step"] for x in got] == [5, 6, 7, 8]
    for a, b in zip(original[4:], got):
        assert b["consumed_samples"] == a["consumed_samples"]
        for k in ("loss", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-5 * abs(a[k]), (a["step"], k, a[k], b[k])


def test_reshard_refuses_an_incomplete_checkpoint(tp2pp2_run, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000004"
    shutil.copytree(tp2pp2_run / "checkpoints" / "step_0000004", ckpt)
    shutil.copyfile(tp2pp2_run / "config.yaml", tmp_path / "run" / "config.yaml")
    (ckpt / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    r = _reshard(ckpt, tmp_path / "out")
    assert r.returncode == 1 and "incomplete ZeRO optimizer shards" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def _export(src: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glm_train.cli.export", "--input", str(src), "--output", str(out),
                           *extra], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def test_export_of_tp2_pp2_reproduces_the_runs_validation_loss(tp2pp2_run, tmp_path):
    from glm_train import load_model
    from glm_train.data.dataset import ValidationSet, collate
    from glm_train.data.indexed import IndexedDataset
    from glm_train.data.tokenizer import GLMTokenizer
    from glm_train.infer.loading import load_trained
    from glm_train.train.loss import masked_token_losses
    from glm_train.train.trainer import special_ids

    out = tmp_path / "export"
    r = _export(tp2pp2_run, out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    model = load_model(out)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    from_run = load_model(tp2pp2_run).state_dict()
    assert all(torch.equal(t, from_run[k]) for k, t in model.state_dict().items())

    _, _, cfg = load_trained(tp2pp2_run)
    tok = GLMTokenizer(out / "tokenizer.model")
    final = [x for x in _records(tp2pp2_run) if "val_loss_en" in x][-1]
    for name, prefix in cfg.data.valid.items():
        vs = ValidationSet(IndexedDataset(prefix), special_ids(tok), cfg.model.seq_length, cfg.eval.gmask_ratio,
                           cfg.eval.max_samples)
        b = collate(vs.samples)
        with torch.no_grad():
            logits = model(b["input_ids"], position_ids=b["position_ids"], prefix_lengths=b["prefix_lengths"])
        assert logits.shape == (*b["input_ids"].shape, cfg.model.vocab_size)
        val = float((masked_token_losses(logits, b["targets"]) * b["loss_mask"]).sum() / b["loss_mask"].sum())
        assert abs(val - final[f"val_loss_{name}"]) < 1e-4, (name, val, final)

    # glm-generate loads the export without DeepSpeed.
    g = subprocess.run([sys.executable, "-m", "glm_train.cli.generate", f"checkpoint={out}", "prompt=the lord",
                        "sampling.max_new_tokens=8"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert g.returncode == 0 and g.stdout.startswith("the lord"), g.stderr[-2000:]
    # bf16 export: half the bytes, same tensors up to rounding.
    r = _export(out, tmp_path / "bf16", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "bf16" / "model.safetensors").stat().st_size < 0.52 * (out / "model.safetensors").stat().st_size


def test_tp_split_and_merge_are_inverse(tp2pp2_run):
    from glm_train.convert.export import load_export_tensors, merge_tp, split_tp

    _, tensors = load_export_tensors(tp2pp2_run)
    for key, full in tensors:
        for world in (2, 4):
            shards = [split_tp(key, full, r, world) for r in range(world)]
            assert torch.equal(merge_tp(key, shards), full), key


def test_damaged_checkpoints_fail_clearly_and_overwrite_nothing(tp2pp2_run, tmp_path):
    from glm_train import load_model

    good = tmp_path / "good_export"
    assert _export(tp2pp2_run, good).returncode == 0
    before = (good / "model.safetensors").read_bytes()
    ckpt = tp2pp2_run / "checkpoints" / (tp2pp2_run / "checkpoints" / "latest").read_text().strip()

    # Truncated layer file.
    bad_run = tmp_path / "truncated"
    shutil.copytree(tp2pp2_run, bad_run)
    victim = bad_run / "checkpoints" / ckpt.name / "layer_02-model_01-model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = _export(bad_run, good)
    assert r.returncode == 1 and "cannot read" in r.stderr and victim.name in r.stderr, r.stderr
    assert (good / "model.safetensors").read_bytes() == before  # the good export is untouched
    assert not (tmp_path / "good_export.tmp").exists()

    # Missing shard.
    missing_run = tmp_path / "missing"
    shutil.copytree(tp2pp2_run, missing_run)
    (missing_run / "checkpoints" / ckpt.name / "layer_03-model_00-model_states.pt").unlink()
    r = _export(missing_run, tmp_path / "never")
    assert r.returncode == 1 and "missing shard" in r.stderr, r.stderr
    assert not (tmp_path / "never").exists()

    # A checkpoint read with another model config's shapes.
    other = tmp_path / "other"
    shutil.copytree(tp2pp2_run, other)
    cfg_file = other / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("hidden: 64", "hidden: 96"))
    with pytest.raises(ValueError, match="shape"):
        load_model(other)


def test_new_run_starts_from_an_export_in_another_layout(tiny_data, tp2pp2_run, tmp_path):
    """checkpoint.load=EXPORT (e.g. GLM-130B weights from glm-import-sat): weights carried, step 0."""
    out = tmp_path / "export"
    assert _export(tp2pp2_run, out).returncode == 0
    recs = _launch(tiny_data, tmp_path / "cont", 2, [*BASE, "train.iters=1", "eval.every=1", "parallel.tp=2",
                                                       f"checkpoint.load={out}"])
    assert [r["step"] for r in recs] == [1]
    start = [x for x in _records(tmp_path / "cont") if "val_loss_en" in x][0]
    source_end = [x for x in _records(tp2pp2_run) if "val_loss_en" in x][-1]
    assert start["step"] == 0
    for k in ("val_loss_en", "val_loss_zh"):
        assert abs(start[k] - source_end[k]) < 1e-5, (k, start[k], source_end[k])
