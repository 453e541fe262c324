"""glm-plan: parameter counts against real modules, stage layout, the GLM-130B verdicts, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from glm_train.config import GLMConfig, ModelConfig, load_config
from glm_train.train.plan import GIB, block_params, plan, stage_blocks
from tests.conftest import REPO


def test_block_params_match_the_module():
    from glm_train.model.layer import GLMBlock

    m = ModelConfig(layers=2, hidden=96, heads=4, vocab_size=256)
    assert block_params(m) == sum(p.numel() for p in GLMBlock(m, 0, 0).parameters())


def test_stages_follow_glm130b_partition():
    assert stage_blocks(70, 8) == [8, 9, 9, 9, 9, 9, 9, 8]
    assert stage_blocks(24, 1) == [24]
    assert sum(stage_blocks(30, 4, "uniform")) == 30


def test_single_gpu_static_memory_is_exact():
    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=4, hidden=128, heads=4, vocab_size=1024)
    cfg.train.micro_batch = cfg.train.global_batch = 2
    r = plan(cfg, 1)
    params = 4 * block_params(cfg.model) + 1024 * 128 + 2 * 128
    st = r["worst"]
    assert st.params == params and st.weights == 4 * params  # fp32
    assert st.optimizer == params * (8 + 4)  # Adam moments + the FP32 gradient partition, ZeRO over dp=1
    assert r["bubble"] == 0


@pytest.mark.parametrize("interval,fits", [(1, True), (0, False)])
def test_glm130b_layout_on_40gb_a100(monkeypatch, interval, fits):
    monkeypatch.setenv("WORLD_SIZE", "768")
    cfg = load_config(["model.vocab_size=150528", f"parallel.activation_checkpoint_interval={interval}"],
                      config_name="glm-130b-3d", check_paths=False)
    r = plan(cfg, 768)
    assert r["dp"] == 24 and r["micro_batches_per_pipeline"] == 176
    assert abs(r["bubble"] - 7 / 183) < 1e-9  # SPEC: 3.8%
    assert (r["worst"].total <= 40 * GIB) is fits, r["worst"].total / GIB


def test_cli_exit_codes():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glm_train.cli.plan", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    ok = run("model=glm-1b", "model.vocab_size=50304", "train.micro_batch=4", "train.global_batch=8",
             "precision=bf16", "--gpu-mem", "80")
    assert ok.returncode == 0 and "fits" in ok.stdout, ok.stderr
    big = run("--config-name=glm-130b-3d", "--world-size", "768", "--gpu-mem", "40", "model.vocab_size=150000",
              "train.grad_accum_fp32=true")
    assert big.returncode == 3 and "DOES NOT FIT" in big.stdout, big.stdout + big.stderr
    bad = run("model.heads=7")
    assert bad.returncode == 2 and "model.heads" in bad.stderr
