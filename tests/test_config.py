"""Config validation fails fast, names the key, and happens before torch or DeepSpeed is imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glm_train.config import ConfigError, load_config
from tests.conftest import REPO, data_overrides


@pytest.mark.parametrize("overrides,needle", [
    (["train.foo=1"], "train.foo"),
    (["+train.foo=1"], "train.foo"),
    (["+bogus=1"], "bogus"),
    (["model.heads=3"], "model.heads"),
    (["precision=fp8"], "fp32, bf16"),
    (["train.iters=abc"], "train.iters"),
    (["parallel.zero_stage=3"], "parallel.zero_stage"),
    (["train.global_batch=12", "train.micro_batch=8"], "train.global_batch"),
    (["stability.egs=[[0,0.1],[10]]"], "stability.egs"),
    (["model.dropout=1.5"], "model.dropout"),
    (["model.heads=4", "parallel.tp=3"], "parallel.tp"),
    (["precision=bf16", "parallel.zero_stage=0"], "parallel.zero_stage"),
    (["parallel.partition=balanced"], "parallel.partition"),
    (["precision=fp16", "parallel.zero_stage=0"], "parallel.zero_stage"),
    (["train.rampup.start=3"], "train.rampup.start"),
    (["train.global_batch=16", "train.micro_batch=4", "train.rampup.start=4", "train.rampup.increment=8"],
     "train.rampup.increment"),
    (["train.decay_samples=100"], "train.warmup_samples"),
    (["stability.guard.lr_factor=2"], "stability.guard.lr_factor"),
    (["stability.guard.min_history=100"], "stability.guard.min_history"),
    (["debug.corrupt_steps=[5,2]"], "debug.corrupt_steps"),
    (["fp16.hysteresis=0"], "fp16.hysteresis"),
    (["stability.z_loss=-1"], "stability.z_loss"),
    (["train.head_chunk=-1"], "train.head_chunk"),
    (["precision=fp16", "train.head_chunk=512"], "train.head_chunk"),
    (["data.sources=[{path:a,weight:1},{path:b}]"], "data.sources"),
    (["data.sources=[{path:a,kind:text}]"], "lm, mip"),
    (["data.sources=[{path:a,bogus:1}]"], "bogus"),
])
def test_bad_values_name_the_key(tiny_data, overrides, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(data_overrides(tiny_data) + overrides)
    assert needle in str(e.value)


def test_missing_data_path_names_the_key(tiny_data):
    with pytest.raises(ConfigError) as e:
        load_config(data_overrides(tiny_data) + ["data.sources=[{path:/nonexistent/en}]"])
    assert "data.sources[0].path" in str(e.value) and "/nonexistent/en" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(["data.tokenizer=/nonexistent/tok.model"])
    assert "data.tokenizer" in str(e.value)


def test_good_config_resolves(tiny_data):
    cfg = load_config(data_overrides(tiny_data) + ["model=tiny", "train.iters=7", "precision=bf16"])
    assert cfg.train.iters == 7 and cfg.model.hidden == 64 and cfg.precision.value == "bf16"


def test_cli_refuses_bad_config_before_heavy_imports(tmp_path):
    # The CLI exits 2 with the key in the message; torch/deepspeed are never imported on that path.
    code = ("import sys; from glm_train.cli.common import run_cli; from glm_train.cli.train import train; "
            "rc = run_cli(train, ['model.heads=3']); "
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'heavy import'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "model.heads" in r.stderr
