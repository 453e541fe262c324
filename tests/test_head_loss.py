"""The fused, chunked head + cross-entropy (train.head_chunk) against the whole head and exact FP64:
the same loss and gradients, less memory kept for backward, the same training run."""

from __future__ import annotations

import pytest
import torch

from benchmarks.timing import saved_storages
from glm_train.model.embedding import GLMEmbedding
from glm_train.parallel.cross_entropy import chunked_head_cross_entropy
from glm_train.train.loss import GLMHeadLoss
from tests.test_train import _steps, _train

N_BATCH, SEQ, HIDDEN, VOCAB = 4, 64, 32, 96


def _embedding(weight: torch.Tensor) -> GLMEmbedding:
    """The tied embedding (TP = 1) holding ``weight``, in its dtype."""
    emb = GLMEmbedding(*weight.shape, std=1.0, seed=0).to(weight.dtype)
    with torch.no_grad():
        emb.weight.copy_(weight)
    return emb


def _inputs(peaked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N_BATCH, SEQ, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * (1.0 if peaked else 0.1)
    targets = torch.randint(0, VOCAB, (N_BATCH, SEQ), generator=g)
    # Loss-mask weights other than 0 and 1 too: the coefficients carry them.
    mask = (torch.rand(N_BATCH, SEQ, generator=g) < 0.5).double() * torch.randint(1, 3, (N_BATCH, SEQ), generator=g)
    return hidden, weight, targets, mask


def _run(chunk: int, dtype: torch.dtype, z_loss: float = 0.0, peaked: bool = False,
         sum_only: bool = False, compiled: bool = False) -> tuple[torch.Tensor, ...]:
    hidden, weight, targets, mask = _inputs(peaked)
    emb = _embedding(weight.to(dtype))
    fn = GLMHeadLoss(emb)
    fn.head_chunk, fn.z_loss, fn.sum_only, fn.compiled = chunk, z_loss, sum_only, compiled
    h = hidden.to(dtype).requires_grad_()
    loss = fn(h, (targets, mask.float()))
    loss.backward()
    return loss.detach().double(), h.grad.double(), emb.weight.grad.double()


def _exact(z_loss: float = 0.0, peaked: bool = False, sum_only: bool = False) -> tuple[torch.Tensor, ...]:
    """The definition in FP64, written out: weighted mean of CE + z lse^2 over the scored tokens."""
    hidden, weight, targets, mask = _inputs(peaked)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h @ w.t()
    lse = torch.logsumexp(logits, dim=-1)
    per_token = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) + z_loss * lse.square()
    loss = (per_token * mask).sum() / (1.0 if sum_only else mask.sum())
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_head_equals_the_whole_head_in_fp32(chunk, z_loss):
    exact, whole, got = _exact(z_loss), _run(0, torch.float32, z_loss), _run(chunk, torch.float32, z_loss)
    for name, a, b, e in zip(("loss", "d hidden", "d weight"), got, whole, exact, strict=True):
        # FP32 rounding (errors of about 2e-7 here), in a different order: equal to rounding.
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
        assert _rel(a, e) < 1e-6 and _rel(a, e) <= 2 * _rel(b, e) + 2e-7, (name, _rel(a, e), _rel(b, e))


@pytest.mark.parametrize("peaked", [False, True], ids=["flat", "peaked"])
def test_chunked_bf16_head_is_as_close_to_exact_as_the_whole_head(peaked):
    exact = _exact(1e-2, peaked)
    whole = _run(0, torch.bfloat16, 1e-2, peaked)
    for chunk in (16, 64, 100_000):
        got = _run(chunk, torch.bfloat16, 1e-2, peaked)
        for name, a, b, e in zip(("loss", "d hidden", "d weight"), got, whole, exact, strict=True):
            # Chunks round the weight gradient's partial sums to bf16 once each: a little more error.
            assert _rel(a, e) <= 1.5 * _rel(b, e) + 1e-6, (chunk, name, _rel(a, e), _rel(b, e))


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_compiled_bf16_chunks_match_the_eager_chunks(z_loss):
    """train.compile's fused head (Inductor kernels per chunk, bf16 at TP = 1) against the eager steps:
    as close to exact FP64 as they are, and equal to them but for rounding. Chunks of 48 leave a
    shorter last chunk, a second shape for the compiled function. FP32 keeps the eager steps."""
    from glm_train.parallel.cross_entropy import compiled_chunk_terms

    exact = _exact(z_loss, peaked=True)
    eager = _run(48, torch.bfloat16, z_loss, peaked=True)
    got = _run(48, torch.bfloat16, z_loss, peaked=True, compiled=True)
    assert compiled_chunk_terms.cache_info().currsize == 1  # the compiled function ran
    for name, a, b, e in zip(("loss", "d hidden", "d weight"), got, eager, exact, strict=True):
        assert _rel(a, b) < 1e-3, (name, _rel(a, b))  # measured: gradients equal, the loss 1e-7 apart
        assert _rel(a, e) <= 1.2 * _rel(b, e) + 1e-6, (name, _rel(a, e), _rel(b, e))
    assert abs(got[0] - eager[0]) <= 1e-6 * abs(eager[0])  # the loss is summed in FP32 either way
    fp32 = _run(48, torch.float32, z_loss, compiled=True)
    for a, b in zip(fp32, _run(48, torch.float32, z_loss), strict=True):
        assert torch.equal(a, b)


def test_sum_only_evaluation_without_grad_equals_the_whole_head():
    hidden, weight, targets, mask = _inputs()
    fn = GLMHeadLoss(_embedding(weight.float()))
    fn.sum_only = True
    with torch.no_grad():
        whole = fn(hidden.float(), (targets, mask.float()))
        fn.head_chunk = 5
        chunked = fn(hidden.float(), (targets, mask.float()))
    exact = _exact(sum_only=True)[0]
    assert _rel(chunked.double(), exact) < 1e-6 and _rel(whole.double(), exact) < 1e-6


def _saved_bytes(chunk: int) -> int:
    hidden, weight, targets, mask = _inputs()
    fn = GLMHeadLoss(_embedding(weight.float()))
    fn.head_chunk = chunk
    h = hidden.float().requires_grad_()
    with saved_storages() as storages:
        fn(h, (targets, mask.float()))
    return sum(storages.values())


def test_chunked_head_keeps_no_logits_for_backward():
    scored = int((_inputs()[3] != 0).sum())
    whole, chunked = _saved_bytes(0), _saved_bytes(16)
    assert whole >= scored * VOCAB * 4  # at least the FP32 log-softmax
    # The hidden states' and the weight's gradients, and the selection's indices: no [N, V] tensor.
    assert chunked <= scored * HIDDEN * 4 + VOCAB * HIDDEN * 4 + N_BATCH * SEQ * 8, chunked
    assert chunked < scored * VOCAB * 4


def test_fp16_is_refused():
    h = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    with pytest.raises(ValueError, match="fp16"):
        chunked_head_cross_entropy(h, torch.randn(10, 8, dtype=torch.float16), torch.zeros(4, dtype=torch.long),
                                   torch.ones(4), 0.0, 2)


@pytest.mark.slow
def test_training_with_the_chunked_head_follows_the_whole_head(tiny_data, tmp_path):
    """Two real runs, the same data and seed, the head whole and in chunks of 5 tokens (many chunks
    per micro-batch), with the z-loss on: the same losses and gradient norms to rounding."""
    common = ["train.iters=6", "eval.every=2", "checkpoint.every=0", "stability.z_loss=1e-3"]
    _train(tiny_data, tmp_path / "whole", *common, "train.head_chunk=0")
    _train(tiny_data, tmp_path / "chunked", *common, "train.head_chunk=5")
    whole, chunked = _steps(tmp_path / "whole"), _steps(tmp_path / "chunked")
    assert len(whole) == len(chunked) == 6
    # The two forms sum in different orders: equal bits throughout would mean the setting never
    # reached the loss.
    assert any(a["loss"] != b["loss"] for a, b in zip(whole, chunked, strict=True))
    for a, b in zip(whole, chunked, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a["step"], a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("dtype,compiled", [(torch.float32, False), (torch.bfloat16, False),
                                            (torch.bfloat16, True)], ids=["fp32", "bf16", "bf16-compiled"])
def test_fused_head_peak_is_the_planners(dtype, compiled):
    """The peak of live tensor bytes (the profiler's allocation events, as plan_check measures a CPU
    run) over one fused head call, forward and backward, against glm-plan's term: the scored states'
    copy and gradient, the FP32 weight gradient and ``fused_head_transient``, within 3%."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.plan_check import allocation_events, peak_live_bytes
    from glm_train.train.plan import fused_head_transient

    n, d, v, chunk = 1024, 64, 4096, 256
    g = torch.Generator().manual_seed(0)
    emb = _embedding(torch.randn(v, d, generator=g) * 0.1).to(dtype)
    fn = GLMHeadLoss(emb)
    fn.head_chunk, fn.compiled = chunk, compiled
    hidden = torch.randn(1, n, d, generator=g).to(dtype).requires_grad_()
    labels = (torch.randint(0, v, (1, n), generator=g), torch.ones(1, n))
    fn(hidden, labels).backward()  # compiles, when compiled
    hidden.grad = emb.weight.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(hidden, labels).backward()
    measured, _ = peak_live_bytes(allocation_events(prof))
    w = hidden.element_size()
    planned = 2 * n * d * w + 4 * v * d + fused_head_transient(chunk, v, d, w, compiled, "cpu")
    assert abs(measured / planned - 1) < 0.03, (measured, planned)


def _engine_step_uses_compiled_head(rank: int, compile_: bool) -> None:
    from benchmarks.gpu_mfu import synthetic_batches
    from glm_train.config import load_config
    from glm_train.env import setup_environment
    from glm_train.parallel.cross_entropy import compiled_chunk_terms
    from glm_train.train.engine import build_engine

    setup_environment()
    cfg = load_config(["model.layers=2", "model.hidden=64", "model.heads=4", "model.seq_length=32",
                       "model.vocab_size=256", "train.micro_batch=2", "train.global_batch=2", "precision=bf16",
                       "train.head_chunk=8", f"train.compile={str(compile_).lower()}"], check_paths=False)
    engine, _ = build_engine(cfg, "gloo")
    batches, _ = synthetic_batches(cfg, 0.5, 1)
    compiled_chunk_terms.cache_clear()
    loss = float(engine.train_batch(iter(batches)))
    assert loss == loss and loss > 0  # finite
    assert compiled_chunk_terms.cache_info().currsize == int(compile_), compiled_chunk_terms.cache_info()


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_train_compile_reaches_the_fused_head(compile_):
    """build_engine hands train.compile to the loss: a bf16 training step of a compiled engine goes
    through the compiled chunk kernels, an eager engine's does not."""
    from tests.multiproc import run_ranks

    run_ranks(_engine_step_uses_compiled_head, 1, compile_, timeout=300)
