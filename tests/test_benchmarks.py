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
