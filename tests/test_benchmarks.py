"""Benchmark scripts stay runnable: each one's CPU path at a tiny size, its rows checked for shape."""

from __future__ import annotations

import json


def test_block_parts_compares_each_part_with_its_replaced_form(tmp_path):
    from benchmarks.block_parts import main

    out = tmp_path / "rows.json"
    assert main(["--parts", "attention", "--batch", "2", "--seq", "32", "--hidden", "32", "--heads", "2",
                 "--rounds", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["case"], r["variant"]) for r in rows] == [
        ("one Part A (s/2)", "composition"), ("one Part A (s/2)", "own backward"),
        ("Part A per sample", "composition"), ("Part A per sample", "own backward")]
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == 2 and r["saved_for_backward_bytes"] > 0
    assert rows[0]["vs_first"] == 1.0 and rows[2]["vs_first"] == 1.0


def test_head_loss_rows_cover_every_chunk_variant(tmp_path):
    from benchmarks.head_loss import main

    out = tmp_path / "rows.json"
    assert main(["--tokens", "64", "--hidden", "32", "--vocab", "256", "--chunks", "0,16", "--rounds", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dtype"], r["head_chunk"]) for r in rows] == [("bf16", "0"), ("bf16", "16"), ("fp32", "0"),
                                                             ("fp32", "16")]
    for r in rows:
        assert r["median_s"] > 0 and len(r["times_s"]) == 2 and r["saved_for_backward_bytes"] > 0


def test_idle_time_is_charged_to_the_host_range_open_meanwhile():
    from benchmarks.idle import OUTSIDE, idle_by_range, merge

    assert merge([(5, 7), (1, 3), (2, 4), (4, 4.5), (8, 8)]) == [(1, 4.5), (5, 7)]
    # Host: Load [0, 2], Forward [2, 10], Step [10, 20], nothing [20, 21], Load [21, 22].
    ranges = [("Load", 0, 2), ("Forward", 2, 10), ("Step", 10, 20), ("Load", 21, 22)]
    # Device: idle [0, 1] (Load), busy [1, 9] in two overlapping kernels, idle [9, 12] (Forward 1, Step
    # 2), busy [12, 18], idle [18, 23] (Step 2, outside 1, Load 1, nothing open 1), busy [23, 25].
    device = [(1, 6), (5, 9), (12, 18), (23, 25)]
    syncs = [(9, 9.5), (11, 11.2), (20.5, 20.6)]
    report = idle_by_range(device, ranges, syncs)
    assert report.window_ms == 25 and report.busy_ms == 16 and report.idle_ms == 9
    rows = {r.name: r for r in report.by_range}
    assert [r.name for r in report.by_range] == ["Step", "Load", "Forward", OUTSIDE]
    assert (rows["Load"].calls, rows["Load"].host_ms, rows["Load"].idle_ms) == (2, 3, 2)
    assert (rows["Forward"].idle_ms, rows["Forward"].syncs) == (1, 1)
    assert (rows["Step"].idle_ms, rows["Step"].syncs) == (4, 1)
    assert abs(rows["Step"].sync_ms - 0.2) < 1e-9
    assert (rows[OUTSIDE].idle_ms, rows[OUTSIDE].syncs) == (2, 1)
    assert sum(r.idle_ms for r in report.by_range) == report.idle_ms


def test_gpu_mfu_profile_names_each_pipeline_instruction(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "mfu.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_mfu.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--layers", "2", "--hidden", "64",
                           "--heads", "4", "--seq", "64", "--vocab", "256", "--micro-batch", "2", "--steps", "1",
                           "--warmup", "1", "--grad-accum", "2", "--profile-top", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    prof = json.loads(out.read_text())["profile"]
    calls = {r["name"]: r["calls"] for r in prof["host_ranges"]}
    assert calls["LoadMicroBatch"] == calls["ForwardPass"] == calls["BackwardPass"] == 2
    assert calls["OptimizerStep"] == 1 and prof["idle"] is None and len(prof["top"]) == 3
    assert "host time by pipeline instruction" in proc.stdout
