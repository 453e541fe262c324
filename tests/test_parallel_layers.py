"""Tensor-parallel blocks on 2 gloo ranks against the plain torch computation of the full tensors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from glm_train.parallel.comm import copy_to_tp
from glm_train.parallel.cross_entropy import (
    chunked_head_cross_entropy,
    vocab_parallel_cross_entropy,
    vocab_parallel_logsumexp,
)
from glm_train.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _materialize,
    normal_init,
    xavier_normal_init,
)
from glm_train.parallel.random import TPRandom
from glm_train.parallel.state import set_tensor_parallel_group
from tests.multiproc import run_ranks

pytestmark = pytest.mark.slow
WORLD = 2


def _worker(rank: int) -> None:
    set_tensor_parallel_group(dist.group.WORLD)
    _check(rank)


def _check(rank: int) -> None:
    torch.manual_seed(0)  # same inputs on both ranks
    x = torch.randn(3, 5, 16, requires_grad=True)
    init = xavier_normal_init(1.0, 2)
    # Column-parallel with interleave=2 ([gate; up]) followed by row-parallel: the GeGLU pattern.
    col = ColumnParallelLinear(16, 2 * 12, init=init, seed=3, key="c", interleave=2)
    row = RowParallelLinear(12, 16, init=xavier_normal_init(0.5), seed=3, key="r")
    gate, up = col(x).chunk(2, dim=-1)
    y = row(F.gelu(gate) * up)
    # Reference: full weights from the same seeds, plain torch.
    wc = _materialize((24, 16), init, 3, "c.weight")
    wr = _materialize((16, 12), xavier_normal_init(0.5), 3, "r.weight")
    xr = x.detach().clone().requires_grad_(True)
    g_ref, u_ref = F.linear(xr, wc).chunk(2, dim=-1)
    y_ref = F.linear(F.gelu(g_ref) * u_ref, wr)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)  # input grad all-reduced
    # This rank's weight slice gets the matching slice of the full gradient.
    wc_full = wc.detach().clone().requires_grad_(True)
    wr_full = wr.detach().clone().requires_grad_(True)
    g2, u2 = F.linear(x.detach(), wc_full).chunk(2, dim=-1)
    F.linear(F.gelu(g2) * u2, wr_full).pow(2).sum().backward()
    gate_rows = wc_full.grad[:12].chunk(WORLD)[rank]
    up_rows = wc_full.grad[12:].chunk(WORLD)[rank]
    torch.testing.assert_close(col.weight.grad, torch.cat([gate_rows, up_rows]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row.weight.grad, wr_full.grad.chunk(WORLD, dim=1)[rank], rtol=1e-5, atol=1e-5)

    # Vocab-parallel embedding and its tied head.
    emb = VocabParallelEmbedding(10, 4, init=normal_init(1.0), seed=5, key="e")
    we = _materialize((10, 4), normal_init(1.0), 5, "e.weight")
    ids = torch.tensor([[0, 4, 5, 9], [3, 7, 2, 6]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, we))
    h = torch.randn(2, 4, 4)
    torch.testing.assert_close(emb.logits(h), h @ we.T, rtol=1e-5, atol=1e-5)

    # Vocab-parallel cross-entropy against torch's on the full logits, value and gradient.
    full = torch.randn(6, 10, dtype=torch.float32)
    target = torch.tensor([0, 4, 5, 9, 3, 7])  # ids on both ranks' slices
    local = full.chunk(WORLD, dim=-1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target)
    ref_in = full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, target, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    w = torch.arange(1, 7, dtype=torch.float32)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(local.grad, ref_in.grad.chunk(WORLD, dim=-1)[rank], rtol=1e-6, atol=1e-6)

    # Vocab-parallel logsumexp (the z-loss) against torch.logsumexp, value and gradient.
    local = full.chunk(WORLD, dim=-1)[rank].clone().requires_grad_(True)
    lse = vocab_parallel_logsumexp(local)
    ref_in = full.clone().requires_grad_(True)
    ref = torch.logsumexp(ref_in, dim=-1)
    torch.testing.assert_close(lse, ref, rtol=1e-6, atol=1e-6)
    (lse.square() * w).sum().backward()
    (ref.square() * w).sum().backward()
    torch.testing.assert_close(local.grad, ref_in.grad.chunk(WORLD, dim=-1)[rank], rtol=1e-6, atol=1e-6)

    # The fused head in chunks (train.head_chunk) on this rank's vocabulary rows against the plain
    # FP32 computation over the full vocabulary: loss, hidden-state gradient (all-reduced by
    # copy_to_tp's backward) and this rank's rows of the weight gradient.
    hid = torch.randn(7, 4)
    coeff = torch.rand(7)
    tgt = torch.tensor([0, 4, 5, 9, 3, 7, 1])
    hl = hid.clone().requires_grad_(True)
    wl = we.chunk(WORLD)[rank].clone().requires_grad_(True)
    fused = chunked_head_cross_entropy(copy_to_tp(hl), wl, tgt, coeff, 1e-2, chunk=3)
    hr, wr_ = hid.clone().requires_grad_(True), we.clone().requires_grad_(True)
    logits = hr @ wr_.T
    lse_r = torch.logsumexp(logits, dim=-1)
    ref = (coeff * (F.cross_entropy(logits, tgt, reduction="none") + 1e-2 * lse_r.square())).sum()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    fused.backward()
    ref.backward()
    torch.testing.assert_close(hl.grad, hr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wl.grad, wr_.grad.chunk(WORLD)[rank], rtol=1e-5, atol=1e-6)

    # TP-aware RNG: the default stream agrees across TP ranks, the forked (sharded) one differs,
    # and the fork is a function of the default stream (replayable by activation recomputation).
    rng = TPRandom()
    rng.seed(1234, pp_rank=0, tp_rank=rank)
    replicated = torch.rand(8)
    state = torch.get_rng_state()
    with rng.fork():
        sharded = torch.rand(8)
    after = torch.rand(8)
    torch.set_rng_state(state)
    with rng.fork():
        replay = torch.rand(8)
    assert torch.equal(replay, sharded)
    gathered = [torch.empty(24) for _ in range(WORLD)]
    dist.all_gather(gathered, torch.cat([replicated, sharded, after]))
    assert torch.equal(gathered[0][:8], gathered[1][:8])
    assert not torch.equal(gathered[0][8:16], gathered[1][8:16])
    assert torch.equal(gathered[0][16:], gathered[1][16:])


def test_tp2_blocks_match_plain_torch():
    run_ranks(_worker, WORLD, timeout=120)
