"""glm-plan: parameter counts against real modules, per-block activations against what autograd saves,
stage layout, the GLM-130B verdicts, the CLI, and plan_check's CPU memory measure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.timing import saved_storages
from glm_train.config import ConfigError, GLMConfig, ModelConfig, Precision, load_config
from glm_train.train.plan import (
    GIB,
    activation_bytes_per_layer,
    block_params,
    largest_micro_batch,
    plan,
    stage_blocks,
    with_micro_batch,
)
from tests.conftest import REPO


def test_block_params_match_the_module():
    from glm_train.model.layer import GLMBlock

    m = ModelConfig(layers=2, hidden=96, heads=4, vocab_size=256)
    assert block_params(m) == sum(p.numel() for p in GLMBlock(m, 0, 0).parameters())


def _saved_bytes(cfg: GLMConfig) -> int:
    """Bytes autograd saves for backward in one GLMBlock forward, as BlockPipe runs it (RoPE tables and
    mask built per layer): every saved tensor's storage counted once, whole, parameters left out."""
    import torch

    from glm_train.model.layer import GLMBlock
    from glm_train.model.mask import attention_mask
    from glm_train.model.rope import rope_tables

    m = cfg.model
    dtype = torch.float32 if cfg.precision == Precision.fp32 else torch.bfloat16
    torch.manual_seed(0)
    block = GLMBlock(m, 1, 0, frozenset(cfg.parallel.selective_recompute)).to(dtype).train()
    params = frozenset(p.untyped_storage().data_ptr() for p in block.parameters())
    b, s = cfg.train.micro_batch, m.seq_length
    x = torch.randn(b, s, m.hidden, dtype=dtype, requires_grad=True)
    with saved_storages(exclude=params) as storages:
        positions = torch.arange(s).expand(b, s) if m.position_encoding == "rope_1d" else \
            torch.stack([torch.arange(s).expand(b, s), torch.zeros(b, s, dtype=torch.long)], dim=1)
        cos, sin = rope_tables(positions, m.hidden // m.heads, m.rope_base, m.position_encoding == "rope_2d", dtype)
        # Part A: half the tokens, the planner's 1 - f (the split kernel's saved rows follow it).
        mask = attention_mask(torch.tensor([s // 2, s // 2]), s, m.attention_impl)
        y = block(x, cos, sin, mask)
    assert y.requires_grad
    return sum(storages.values())


_IMPLS = ("sdpa", "eager", "split", "blocks")
_LAYER_CASES = [(impl, prec, rec, 0.0) for impl in _IMPLS for prec in ("fp32", "bf16")
                for rec in ((), ("attention",), ("geglu",), ("attention", "geglu"))]
_LAYER_CASES += [(impl, prec, rec, 0.1) for impl in _IMPLS for prec in ("fp32", "bf16")
                 for rec in ((), ("attention", "geglu"))]


@pytest.mark.parametrize("impl,precision,recompute,dropout", _LAYER_CASES)
def test_activation_bytes_per_layer_match_saved_tensors(impl, precision, recompute, dropout, blocks_at_any_size):
    # Sizes with s != h and a head size that is not h / 2, so that no term can stand in for another;
    # on CPU (device="cpu": dropout keeps its noise, SDPA with attention dropout takes the math path).
    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=2, hidden=96, heads=4, seq_length=80, vocab_size=256, attention_impl=impl,
                            dropout=dropout, attention_dropout=dropout)
    cfg.train.micro_batch = 2
    cfg.precision = Precision(precision)
    cfg.parallel.selective_recompute = list(recompute)
    measured = _saved_bytes(cfg)
    assert activation_bytes_per_layer(cfg, "cpu") == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("impl,precision,dropout", [("sdpa", "fp32", 0.0), ("sdpa", "fp32", 0.1),
                                                    ("split", "bf16", 0.1), ("split", "fp32", 0.1),
                                                    ("blocks", "bf16", 0.0)])
def test_compiled_block_keeps_what_the_planner_says(impl, precision, dropout, blocks_at_any_size, monkeypatch):
    """train.compile: Inductor recomputes gelu(gate) and keeps bool dropout masks; the planner's
    compile rule against what one torch.compile'd block saves for backward."""
    import torch

    from glm_train.model import layer

    class CompiledBlock(layer.GLMBlock):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._compiled = torch.compile(super().forward)

        def forward(self, *args):  # type: ignore[override]
            return self._compiled(*args)

    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=2, hidden=96, heads=4, seq_length=80, vocab_size=256, attention_impl=impl,
                            dropout=dropout, attention_dropout=dropout)
    cfg.train.micro_batch = 2
    cfg.precision = Precision(precision)
    eager = activation_bytes_per_layer(cfg, "cpu")
    monkeypatch.setattr(layer, "GLMBlock", CompiledBlock)  # _saved_bytes builds the block it names
    measured = _saved_bytes(cfg)
    cfg.train.compile = True
    assert activation_bytes_per_layer(cfg, "cpu") == pytest.approx(measured, rel=0.02)
    assert measured < 0.95 * eager  # not vacuous: compiled blocks keep measurably less


def test_activation_bytes_per_layer_2d_rope():
    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=2, hidden=96, heads=4, seq_length=80, vocab_size=256, position_encoding="rope_2d")
    cfg.train.micro_batch = 2
    assert activation_bytes_per_layer(cfg, "cpu") == pytest.approx(_saved_bytes(cfg), rel=0.02)


def test_selective_recompute_lowers_the_plan():
    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=4, hidden=256, heads=4, seq_length=512, vocab_size=1024, attention_impl="eager")
    cfg.train.micro_batch = cfg.train.global_batch = 2
    base = plan(cfg, 1)
    cfg.parallel.selective_recompute = ["attention", "geglu"]
    sel = plan(cfg, 1)
    # The S x S matrices go: at least the FP32 softmax of b * a * s^2 elements.
    assert base["activations_per_layer"] - sel["activations_per_layer"] > 2 * 4 * 512**2 * 4
    assert sel["activations_per_layer_full"] == base["activations_per_layer"]
    assert sel["worst"].activations < base["worst"].activations


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
    # Adam moments and the FP32 master (DeepSpeed's ZeRO-1 clones it even in fp32), and in the step
    # the FP32 gradient partition; ZeRO over dp=1
    assert st.optimizer == params * (8 + 4) and st.step == params * 4
    assert r["bubble"] == 0
    cfg.parallel.zero_stage = 0  # fp32 without ZeRO: DeepSpeed steps torch's AdamW on the model itself
    assert plan(cfg, 1)["worst"].optimizer == params * 8


def test_gradient_bytes_follow_the_fp32_sums():
    """bf16 with train.grad_accum_fp32: the planner's gradients follow grad_accum.py (the first
    micro-batch's gradient kept as it is, FP32 sums from the second backward on)."""
    from glm_train.config import Precision

    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=4, hidden=128, heads=4, vocab_size=1024)
    cfg.precision = Precision.bf16
    cfg.train.micro_batch = 2
    by_accum = {}
    for accum in (1, 2, 3):
        cfg.train.global_batch = 2 * accum
        by_accum[accum] = plan(cfg, 1)["worst"]
    one, two, three = by_accum[1], by_accum[2], by_accum[3]
    p = one.params
    assert one.gradients == 2 * p and one.early_gradients is None  # one micro-batch: never converted
    assert two.gradients == 4 * p and two.early_gradients == 2 * p  # bf16 at the loss, FP32 at the flush
    assert three.gradients == 4 * p and three.early_gradients is None  # FP32 from the second on
    assert one.peak < two.peak < three.peak


def test_zero_bucket_is_capped_at_the_rank_parameters():
    """The engine's reduce_bucket_size and the plan's bucket: min(5e8, local parameters), or the key."""
    from glm_train.train.engine import deepspeed_config

    cfg = GLMConfig()
    cfg.model = ModelConfig(layers=4, hidden=128, heads=4, vocab_size=1024)
    cfg.train.micro_batch = cfg.train.global_batch = 2
    cfg.precision = Precision.bf16
    st = plan(cfg, 1)["worst"]
    assert st.bucket == st.params * 2  # bf16: one bucket holding every gradient
    assert deepspeed_config(cfg, 1_234_567)["zero_optimization"]["reduce_bucket_size"] == 1_234_567
    assert deepspeed_config(cfg, 10**10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    cfg.parallel.zero_bucket_elements = 3000
    assert deepspeed_config(cfg, 1_234_567)["zero_optimization"]["reduce_bucket_size"] == 3000
    assert plan(cfg, 1)["worst"].bucket == 3000 * 2
    with pytest.raises(ConfigError, match="parallel.zero_bucket_elements"):
        load_config(["parallel.zero_bucket_elements=0"], check_paths=False)


@pytest.mark.parametrize("interval,fits", [(1, True), (0, False)])
def test_glm130b_layout_on_40gb_a100(monkeypatch, interval, fits):
    monkeypatch.setenv("WORLD_SIZE", "768")
    cfg = load_config(["model.vocab_size=150528", f"parallel.activation_checkpoint_interval={interval}"],
                      config_name="glm-130b-3d", check_paths=False)
    r = plan(cfg, 768)
    assert r["dp"] == 24 and r["micro_batches_per_pipeline"] == 176
    assert abs(r["bubble"] - 7 / 183) < 1e-9  # SPEC: 3.8%
    assert (r["worst"].total <= 40 * GIB) is fits, r["worst"].total / GIB
    worst = r["worst"]
    assert worst.stage == 0 and worst.grads_at_peak  # 8 micro-batches in flight; 176 > 8, so gradients exist
    cfg.train.grad_accum_fp32 = True  # FP32 sums replace the fp16 gradients until the step: +2 bytes/param
    assert plan(cfg, 768)["worst"].peak - worst.peak == pytest.approx(2 * worst.params)


@pytest.mark.parametrize("overrides,world", [
    (["precision=bf16", "train.micro_batch=2", "train.global_batch=2"], 1),
    (["precision=bf16", "train.micro_batch=2", "train.global_batch=8", "train.compile=true"], 1),  # FP32 sums
    (["precision=fp32", "train.micro_batch=1", "train.global_batch=8", "parallel.pp=2"], 4),  # dp=2
])
def test_largest_micro_batch_is_the_largest_that_fits(overrides, world, monkeypatch):
    """Against a linear scan of plan(): the search returns the last micro-batch that fits, keeps the
    micro-batches per pipeline, and says None when micro-batch 1 does not fit."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = load_config(["model=glm-1b", "model.vocab_size=50304", *overrides], check_paths=False)
    per_pipe = plan(cfg, world)["micro_batches_per_pipeline"]
    totals = [plan(with_micro_batch(cfg, b, world), world)["worst"].total for b in range(1, 41)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    for gib in (30, 45, 60, 80):
        fitting = [b for b, t in enumerate(totals, 1) if t <= gib * GIB]
        assert largest_micro_batch(cfg, world, gib * GIB) == (fitting[-1] if fitting else None), gib
    b = largest_micro_batch(cfg, world, 80 * GIB)
    assert b is not None and plan(with_micro_batch(cfg, b, world), world)["micro_batches_per_pipeline"] == per_pipe
    assert largest_micro_batch(cfg, world, 1 * GIB) is None
    assert largest_micro_batch(cfg, world, 10**6 * GIB, limit=100) == 100


def test_cli_exit_codes():
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glm_train.cli.plan", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120)

    ok = run("model=glm-1b", "model.vocab_size=50304", "train.micro_batch=4", "train.global_batch=8",
             "precision=bf16", "--gpu-mem", "80")
    assert ok.returncode == 0 and "fits" in ok.stdout, ok.stderr
    big = run("--config-name=glm-130b-3d", "--world-size", "768", "--gpu-mem", "40", "model.vocab_size=150000",
              "parallel.activation_checkpoint_interval=0")
    assert big.returncode == 3 and "DOES NOT FIT" in big.stdout, big.stdout + big.stderr
    selective = run("model=glm-1b", "model.vocab_size=50304", "train.micro_batch=4", "train.global_batch=8",
                    "precision=bf16", "--gpu-mem", "80", "parallel.selective_recompute=[geglu]")
    assert selective.returncode == 0 and "selective recompute: geglu" in selective.stdout, selective.stderr
    fit = run("model=glm-1b", "model.vocab_size=50304", "train.micro_batch=1", "train.global_batch=4",
              "precision=bf16", "--gpu-mem", "79", "--max-micro-batch")
    assert fit.returncode == 0, fit.stdout + fit.stderr
    last = fit.stdout.strip().splitlines()[-1]
    assert last.startswith("largest micro-batch that fits 79 GiB: ") and "(global batch " in last, last
    b = int(last.split(": ")[1].split()[0])
    assert f"micro-batch {b}, global {4 * b} (4 micro-batches per pipeline)" in fit.stdout
    none = run("model=glm-1b", "model.vocab_size=50304", "precision=bf16", "--gpu-mem", "8", "--max-micro-batch")
    assert none.returncode == 3 and "not even micro-batch 1 fits" in none.stdout, none.stdout
    bad = run("model.heads=7")
    assert bad.returncode == 2 and "model.heads" in bad.stderr


def test_profiler_peak_is_the_peak_of_live_tensor_bytes():
    # benchmarks/plan_check.py's CPU measure: a running sum of the profiler's allocation and free events,
    # autograd's included (CPU backward runs on the calling thread, which the profiler watches).
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.plan_check import allocation_events, peak_live_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.empty(250_000)  # 1 MB
        b = torch.empty(500_000)  # 2 MB
        del a
        x = torch.ones(750_000, requires_grad=True)  # 3 MB: live 5 MB
        (x * 2.0).sum().backward()  # x.grad: 3 MB more, live 8 MB at the end
        del b
    events = allocation_events(prof)
    peak, _ = peak_live_bytes(events)
    assert abs(peak - 8_000_000) < 1000, peak  # b, x and x * 2 (or x.grad), plus a few scalars
    assert sum(e[1] for e in events) == 6_000_000  # x and x.grad remain
