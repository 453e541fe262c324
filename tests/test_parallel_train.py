"""Every tp x pp x dp layout trains like one process (real torchrun ranks, DeepSpeed, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_same_curve, data_overrides

pytestmark = pytest.mark.slow

# Clipping at 0.5 is active on most steps here, so a miscounted norm changes the losses too.
COMMON = ["model=tiny", "model.layers=4", "train.iters=5", "train.micro_batch=2", "train.global_batch=8",
          "train.lr=3e-3", "train.warmup_iters=1", "train.clip_grad=0.5", "eval.every=5", "eval.max_samples=8",
          "checkpoint.every=0", "train.progress=false"]
RTOL = 1e-5


def _launch(tiny_data, run_dir: Path, nproc: int, *extra: str, common: list[str] = COMMON) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "glm_train.cli.train", *data_overrides(tiny_data), *common, f"run.dir={run_dir}", *extra]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, f"{extra} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _layout(tp: int, pp: int, dp: int) -> tuple[int, list[str]]:
    return tp * pp * dp, [f"parallel.tp={tp}", f"parallel.pp={pp}"]


def _compare(ref: list[dict], got: list[dict], rtol: float) -> None:
    assert [r["step"] for r in ref] == [r["step"] for r in got]
    for a, b in zip(ref, got):
        for key in ("loss", "grad_norm", "val_loss_en", "val_loss_zh"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rtol), (a["step"], key, a[key], b[key])


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[str, list[dict]]:
    base = tmp_path_factory.mktemp("ref")
    return {"fp32": _launch(tiny_data, base / "fp32", 1),
            "bf16": _launch(tiny_data, base / "bf16", 1, "precision=bf16")}


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1)])
def test_fp32_zero1_layouts_match_one_process(tiny_data, reference, tmp_path, layout):
    n, extra = _layout(*layout)
    timed = layout == (1, 2, 1)  # run.timers on a pipeline: its send/receive times, and nothing else changes
    got = _launch(tiny_data, tmp_path / "run", n, *extra, *(["run.timers=true"] if timed else []))
    _compare(reference["fp32"], got, RTOL)
    if timed:  # metrics.jsonl is rank 0's, the first stage: it sends activations and receives gradients
        for r in (r for r in got if "loss" in r):
            t = {k for k in r if k.startswith("time_")}
            assert {"time_forward_s", "time_send_activation_s", "time_recv_grad_s", "time_optimizer_s"} <= t, t
            assert "time_recv_activation_s" not in t


@pytest.mark.parametrize("layout", [(1, 2, 1), (2, 2, 1)])
def test_fp32_zero0_pipeline_layouts_match_one_process(tiny_data, reference, tmp_path, layout):
    # DeepSpeed's own clipping is wrong here; ours (parallel/grad_norm.py) must give the true norm.
    n, extra = _layout(*layout)
    _compare(reference["fp32"], _launch(tiny_data, tmp_path / "run", n, *extra, "parallel.zero_stage=0"), RTOL)


def test_bf16_tp2_pp2_close_to_one_process(tiny_data, reference, tmp_path):
    n, extra = _layout(2, 2, 1)
    got = _launch(tiny_data, tmp_path / "run", n, *extra, "precision=bf16")
    # bf16 rounds activations to 8 bits of mantissa; different reduction orders under TP then
    # differ by a few bf16 ulps (2^-8 relative).
    _compare(reference["bf16"], got, 2e-2)


@pytest.mark.parametrize("impl", ["auto", "split"])
def test_tp2_pp2_resume_and_recompute_are_exact_with_dropout(tiny_data, tmp_path, impl):
    # split (the GPU default): its own backward in the full run and in DeepSpeed's block replays,
    # autograd's composition under selective recomputation; bitwise alike, TP's dropout fork included.
    n, extra = _layout(2, 2, 1)
    extra = [*extra, f"model.attention_impl={impl}"]
    full = _launch(tiny_data, tmp_path / "full", n, *extra, "model.dropout=0.1", "model.attention_dropout=0.1")
    # Activation recomputation must replay the same dropout masks (TP-sharded ones included), whole
    # blocks and, inside their replay, the selectively recomputed attention core and GeGLU.
    recomputed = _launch(tiny_data, tmp_path / "recompute", n, *extra, "model.dropout=0.1",
                         "model.attention_dropout=0.1", "parallel.activation_checkpoint_interval=1",
                         "parallel.selective_recompute=[attention,geglu]")
    assert_same_curve(full, recomputed)
    _launch(tiny_data, tmp_path / "resumed", n, *extra, "model.dropout=0.1", "model.attention_dropout=0.1",
            "train.exit_at_step=3", "checkpoint.every=3")
    resumed = _launch(tiny_data, tmp_path / "resumed", n, *extra, "model.dropout=0.1",
                      "model.attention_dropout=0.1")
    steps = [r for r in full if "loss" in r]
    assert_same_curve(steps, [r for r in resumed if "loss" in r])


def test_rampup_pp2_dp2_matches_one_process(tiny_data, tmp_path):
    # micro 2 x dp 2: the batch grows 4 -> 8 after 8 samples, on 4 ranks as on one.
    ramp = ["train.rampup.start=4", "train.rampup.increment=4", "train.rampup.samples=8"]
    ref = _launch(tiny_data, tmp_path / "ref", 1, *ramp)
    got = _launch(tiny_data, tmp_path / "run", 4, *_layout(1, 2, 2)[1], *ramp)
    steps = [r for r in got if "loss" in r]
    assert [r["global_batch"] for r in steps] == [4, 4, 8, 8, 8]
    _compare(ref, got, RTOL)


GUARD = ["model=tiny", "train.micro_batch=4", "train.global_batch=8", "train.lr=3e-3", "train.warmup_iters=2",
         "train.progress=false", "train.iters=40", "checkpoint.every=10", "eval.every=40", "eval.max_samples=8",
         "debug.corrupt_steps=[25,29]"]


def test_guard_rollback_pp2_matches_one_process(tiny_data, tmp_path):
    ref = _launch(tiny_data, tmp_path / "ref", 1, common=GUARD)
    got = _launch(tiny_data, tmp_path / "pp2", 2, "parallel.pp=2", common=GUARD)

    def events(recs: list[dict]) -> list[tuple]:
        return [(r["step"], r["guard_event"], r.get("reason")) for r in recs if "guard_event" in r]

    assert ("rollback" in [e[1] for e in events(ref)]) and events(got) == events(ref)
    _compare([r for r in ref if "guard_event" not in r], [r for r in got if "guard_event" not in r], RTOL)
    assert json.loads((tmp_path / "pp2" / "skipped_samples.json").read_text()) == \
        json.loads((tmp_path / "ref" / "skipped_samples.json").read_text())


def test_zero_bucket_size_changes_no_result(tiny_data, tmp_path):
    """ZeRO-1 at dp=2 in bf16: the default bucket (capped at the rank's parameters: one bucket) against
    buckets far smaller than one layer (many reductions, the embedding on its own): the same sums of
    the same two gradients, so bitwise the same losses and norms."""
    capped = _launch(tiny_data, tmp_path / "capped", 2, "precision=bf16")
    small = _launch(tiny_data, tmp_path / "small", 2, "precision=bf16", "parallel.zero_bucket_elements=3000")
    assert_same_curve(capped, small, ("loss", "grad_norm", "val_loss_en", "val_loss_zh"))
    assert len([r for r in capped if "loss" in r]) == 5
