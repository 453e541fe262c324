"""The training blend: weighted lm + MIP sources, deterministic order, resumable, guarded on resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools.mip import build_mip
from glm_train.config import ObjectiveConfig
from glm_train.data.dataset import GLMTrainData
from glm_train.data.indexed import IndexedDataset
from glm_train.data.mip import MIPDataset
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.train.trainer import special_ids
from tests.conftest import data_overrides


@pytest.fixture(scope="module")
def mip_prefix(tiny_data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("mip")
    recs = [{"prompt": f"the lord said unto moses {i}", "target": f" {i % 7}"} for i in range(300)]
    (out / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    build_mip(out / "tasks.jsonl", out / "mip", tiny_data["tokenizer"])
    return str(out / "mip")


def _blend(tiny_data, mip_prefix, weights, seed=1) -> GLMTrainData:
    tok = GLMTokenizer(tiny_data["tokenizer"])
    base = tiny_data["dir"]
    sources = [("lm", IndexedDataset(f"{base}/en_train")), ("lm", IndexedDataset(f"{base}/zh_train")),
               ("mip", MIPDataset(mip_prefix))]
    return GLMTrainData(sources, special_ids(tok), 64, seed, ObjectiveConfig(), weights)


def test_blend_proportions_within_one_percent(tiny_data, mip_prefix):
    data = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2])
    counts = np.bincount([data.source_of(i) for i in range(20000)], minlength=3) / 20000
    assert np.abs(counts - [0.5, 0.3, 0.2]).max() < 0.01, counts


def test_order_is_deterministic_and_seeded(tiny_data, mip_prefix):
    a = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2])
    b = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2])
    c = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2], seed=2)
    ids_a = [a.sample(i).input_ids for i in range(200)]
    assert all(np.array_equal(x, b.sample(i).input_ids) for i, x in enumerate(ids_a))
    assert not all(np.array_equal(x, c.sample(i).input_ids) for i, x in enumerate(ids_a))


def test_resume_from_any_count_continues_the_same_stream(tiny_data, mip_prefix):
    # Past one epoch too, so wrap-around is covered.
    ref = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2])
    n = ref.epoch_size + 40
    stream = [ref.sample(i).input_ids for i in range(n)]
    for start in [0, 1, 17, ref.epoch_size - 3, ref.epoch_size, n - 5]:
        fresh = _blend(tiny_data, mip_prefix, [0.5, 0.3, 0.2])
        assert all(np.array_equal(fresh.sample(i).input_ids, stream[i]) for i in range(start, n))


def test_mip_samples_put_prompt_in_part_a(tiny_data, mip_prefix):
    data = _blend(tiny_data, mip_prefix, [0.0, 0.0, 1.0])
    tok = GLMTokenizer(tiny_data["tokenizer"])
    s = data.sample(0)
    assert s.kind == "mip" and s.input_ids[s.prefix_length - 1] == tok.gmask_id
    assert s.input_ids[s.prefix_length] == tok.sop_id and s.loss_mask[: s.prefix_length].sum() == 0


@pytest.mark.slow
def test_resume_with_changed_data_config_is_refused(tiny_data, mip_prefix, tmp_path):
    from tests.test_train import _run

    run_dir = tmp_path / "run"
    common = [*data_overrides(tiny_data), "model=tiny", "train.iters=6", "train.micro_batch=4",
              "train.global_batch=8", "eval.every=0", "checkpoint.every=3", "train.progress=false",
              f"run.dir={run_dir}"]
    blend = (f"data.sources=[{{path:{tiny_data['dir']}/en_train,weight:0.5}},"
             f"{{path:{tiny_data['dir']}/zh_train,weight:0.4}},{{path:{mip_prefix},weight:0.1,kind:mip}}]")
    _run("glm_train.cli.train", [*common, blend, "train.exit_at_step=3"])
    changed = blend.replace("weight:0.4", "weight:0.3")
    r = _run("glm_train.cli.train", [*common, changed], check=False)
    assert r.returncode != 0 and "data config differs" in r.stderr and "data.allow_change" in r.stderr
    r = _run("glm_train.cli.train", [*common, changed, "data.allow_change=true"])
    steps = [json.loads(ln)["step"] for ln in Path(run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def _race_worker(path: str, marker: str, out: str) -> None:
    from glm_train.data.dataset import cached_array

    def build() -> np.ndarray:
        with open(marker, "a") as f:
            f.write("built\n")
        import time

        time.sleep(0.3)  # widen the window in which the others look for the file
        return np.arange(1000, dtype=np.int64) * 7

    arr = cached_array(Path(path), build)
    np.save(out, np.asarray(arr))


def test_sample_index_is_built_once_under_concurrent_ranks(tmp_path):
    import multiprocessing as mp

    path, marker = tmp_path / "cache" / "epoch_000000.npy", tmp_path / "built.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_race_worker, args=(str(path), str(marker), str(tmp_path / f"out{i}.npy")))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    assert marker.read_text().count("built") == 1
    for i in range(4):
        assert np.array_equal(np.load(tmp_path / f"out{i}.npy"), np.arange(1000) * 7)
    assert not list(path.parent.glob("*.tmp.*")) and not list(path.parent.glob("*.lock"))


def test_cached_index_equals_in_memory_order(tiny_data, mip_prefix, tmp_path):
    tok = GLMTokenizer(tiny_data["tokenizer"])
    base = tiny_data["dir"]
    sources = [("lm", IndexedDataset(f"{base}/en_train")), ("mip", MIPDataset(mip_prefix))]
    mem = GLMTrainData(sources, special_ids(tok), 64, 5, ObjectiveConfig(), [0.7, 0.3])
    disk = GLMTrainData(sources, special_ids(tok), 64, 5, ObjectiveConfig(), [0.7, 0.3], cache_dir=tmp_path)
    n = 2 * mem.epoch_size + 7
    assert [mem._window_of(i) for i in range(n)] == [disk._window_of(i) for i in range(n)]
    assert len(list(disk.cache_dir.glob("epoch_*.npy"))) == 3
    # A reader reopening the cache gets the same order without rebuilding.
    again = GLMTrainData(sources, special_ids(tok), 64, 5, ObjectiveConfig(), [0.7, 0.3], cache_dir=tmp_path)
    assert [again._window_of(i) for i in range(50)] == [mem._window_of(i) for i in range(50)]
