"""GLM's prefix attention on CPU without computing the keys the mask hides.

The masked SDPA kernel scores every query against every key and then throws away what the prefix
mask hides; on a CPU that is real time (the kernel's causal mode skips nothing at S <= 512, its key
block being the whole sequence). Here each sample runs as a few calls, each over only the keys its
queries can see:

- Part A's queries against Part A's keys, with no mask at all;
- Part B's queries in near-equal chunks, each against the keys up to its own last query, under a
  causal mask that is a view into one cached [S, S] table.

With Part A between a quarter and three quarters of the sequence that is about 70% of the masked
kernel's work. The model FLOPs do not change (attention counts the full S x S, as Megatron's and
nanoGPT's formulas do). Values equal the masked kernel's to rounding: the softmax sums run over the
same visible terms, in other blocks.

A block is computed by one of two kernels: in FP32 by the CPU flash kernel itself (its forward and
backward ops), in bf16 by matmuls and a softmax whose probabilities are kept for backward
(:class:`_PrefixBlocksMatmul`, where the reason is).
"""

from __future__ import annotations

import functools

import torch

from glm_train.model.mask import host_lengths

# The CPU flash-attention kernel and its backward, as SDPA calls them.
_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Most queries per Part-B call. The flash kernel splits a call's queries into blocks of 64 from 192
# queries on (32 below, which ran slower per score); 128 and 256 timed the same in fp32. The matmul
# kernel (bf16) timed the same with 256 as with 512 at S = 512 and 1024; at 2048 and 4096 its blocks
# of 512 queries ran as slow as the masked kernel, of 256 at 0.85-0.88 of it (FP32 score blocks of
# 512 x S outgrow the caches between the matmul and the softmax's passes).
CHUNK = 256


def available() -> bool:
    """Whether this torch exposes the CPU kernel this module calls."""
    return _FORWARD is not None and _BACKWARD is not None


# Scores per sample and TP rank (heads x S x S) from which the per-sample calls beat one masked call
# over the batch, by the dtype attention runs in: below, their fixed cost per call outweighs the keys
# they skip. 2 Zen 4 threads, batch 8, forward + backward (docs/performance.md): bf16 matmuls 7.2-11.7
# against 4.5-7.7 ms at 2 heads x 128^2, level or faster from 2^17 on (2 x 256^2: 9.7-10.3 against
# 8.8-10.3; 8 x 128^2: 11.1-12.6 against 16.2-16.3); the FP32 flash blocks 10.2 against 8.7 at
# 2 x 256^2 and 13.0 against 12.4 at 8 x 128^2, faster from 2^19 on (2 x 512^2: 33.3 against 34.7;
# 8 x 512^2: 88 against 113).
MIN_SCORES = {torch.float32: 1 << 19, torch.bfloat16: 1 << 17}

# Longest sequence the matmul kernel (bf16) runs: measured faster up to 1024 (0.75 of the masked
# kernel's time at 8 heads x 1024, batch 8); at 2048 and 4096 within noise of it (0.85-1.09 over
# runs), while it keeps B x H x S x S probabilities.
MATMUL_MAX_SEQ = 1024


def pays_off(dtype: torch.dtype, heads: int, seq_len: int) -> bool:
    """Whether the per-sample calls beat one masked call for attention in ``dtype`` over this many
    heads (per TP rank) and keys, on this process's threads.

    Enough work per sample (:data:`MIN_SCORES`); in bf16 no longer sequences than
    :data:`MATMUL_MAX_SEQ`; in FP32 no more threads than heads: the flash
    kernel's backward runs one task per (sample, head), so a call for one sample keeps at most
    ``heads`` threads busy, where the masked call over the whole batch keeps all of them busy (2
    threads: 1 head 26.7 against 18.0 ms masked, 2 heads 28.5 against 35.6, for 8x512x64 per head,
    fp32 forward and backward). bf16 runs on matmuls, which use every thread in each call.
    """
    if dtype not in MIN_SCORES or heads * seq_len * seq_len < MIN_SCORES[dtype]:
        return False
    if dtype == torch.bfloat16:
        return seq_len <= MATMUL_MAX_SEQ
    return available() and torch.get_num_threads() <= heads


def kernel(dtype: torch.dtype, dropout_p: float, heads: int, seq_len: int) -> str | None:
    """The kernel ``attention_impl=blocks`` runs for attention in ``dtype`` with this dropout, this
    many heads (per TP rank) and keys: "flash" (FP32, :class:`_PrefixBlocks`), "matmul" (bf16,
    :class:`_PrefixBlocksMatmul`), or None where the masked kernel does (model/attention.py): with
    dropout (neither kernel here has any), where it does not pay (:func:`pays_off`), and in fp16.
    model/attention.py hands bf16 here only on CPUs with native bf16 dot products (elsewhere it
    upcasts to FP32 first)."""
    if dropout_p != 0.0 or not pays_off(dtype, heads, seq_len):
        return None
    return "matmul" if dtype == torch.bfloat16 else "flash"


def runs(dtype: torch.dtype, dropout_p: float, heads: int, seq_len: int) -> bool:
    """Whether ``attention_impl=blocks`` runs one of this module's kernels (:func:`kernel`)."""
    return kernel(dtype, dropout_p, heads, seq_len) is not None


def sample_blocks(prefix: int, seq_len: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(first query, end of queries) of one sample's calls: Part A's if it has one, then Part B's
    chunks, near-equal so that none is left with a handful of queries. A call sees the keys up to
    the end of its queries; the last call sees every key."""
    a = min(max(prefix, 0), seq_len)
    rest = seq_len - a
    n = -(-rest // chunk)
    bounds = [a + rest * i // n for i in range(n + 1)] if n else []
    return ([(0, a)] if a > 0 else []) + list(zip(bounds, bounds[1:]))


def computed_fraction(prefix: int, seq_len: int, chunk: int = CHUNK) -> float:
    """Share of a sample's S x S scores that its blocks compute (the visible ones plus the hidden
    half of each Part-B block's causal triangle); the matmul kernel keeps that many probabilities."""
    return sum((q1 - q0) * q1 for q0, q1 in sample_blocks(prefix, seq_len, chunk)) / seq_len**2


@functools.lru_cache(maxsize=4)
def _causal_table(seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [S, S]: key j hidden from query i where j > i."""
    return torch.full((seq_len, seq_len), float("-inf"), dtype=dtype).triu(1)


def _mask(q0: int, q1: int, prefix: int, table: torch.Tensor) -> torch.Tensor | None:
    # Part B's queries (q0 >= prefix) see Part A and the keys up to themselves: causal over [0, q1).
    return None if q1 <= prefix else table[q0:q1, :q1].view(1, 1, q1 - q0, q1)


class _PrefixBlocks(torch.autograd.Function):
    """Attention output [B, H, S, D] (laid out as [B, S, H, D], as SDPA's CPU kernel lays it out)."""

    @staticmethod
    def forward(ctx, q, k, v, lengths):  # type: ignore[override]
        b, h, s, d = q.shape
        table = _causal_table(s, q.dtype)
        out = q.new_empty(b, s, h, d).transpose(1, 2)
        lse = q.new_empty(b, h, s, dtype=torch.float32)
        for i, a in enumerate(lengths):
            for q0, q1 in sample_blocks(a, s):
                rows = (slice(i, i + 1), slice(None), slice(q0, q1))
                out[rows], lse[rows] = _FORWARD(q[rows], k[i:i + 1, :, :q1], v[i:i + 1, :, :q1],
                                                attn_mask=_mask(q0, q1, a, table))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lengths = lengths
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        b, h, s, d = q.shape
        table = _causal_table(s, q.dtype)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        gq, gk, gv = (q.new_empty(b, s, h, d).transpose(1, 2) for _ in range(3))
        for i, a in enumerate(ctx.lengths):
            acc_k = acc_v = None
            # The last call sees every key; the earlier ones add to the gradients of the first keys.
            for q0, q1 in reversed(sample_blocks(a, s)):
                rows = (slice(i, i + 1), slice(None), slice(q0, q1))
                dq, dk, dv = _BACKWARD(grad_out[rows], q[rows], k[i:i + 1, :, :q1], v[i:i + 1, :, :q1],
                                       out[rows], lse[rows], 0.0, False, attn_mask=_mask(q0, q1, a, table))
                gq[rows] = dq
                if acc_k is None:
                    acc_k, acc_v = dk, dv
                else:
                    acc_k[:, :, :q1] += dk
                    acc_v[:, :, :q1] += dv
            gk[i:i + 1] = acc_k
            gv[i:i + 1] = acc_v
        return gq, gk, gv, None


class _PrefixBlocksMatmul(torch.autograd.Function):
    """The blocks of :class:`_PrefixBlocks` for bf16 q, k, v, from batched matmuls over the heads of
    one sample, a softmax, and its probabilities kept for backward.

    Why: PyTorch's CPU flash kernel reaches about a quarter of the bf16 matmul peak on CPUs whose
    bf16 dot products are native (AVX512-BF16), where matmuls run near it. With scores and
    probabilities written out, a block costs its matmuls plus a few element-wise passes over its
    scores, and the backward needs no recomputation: the benchmark's masked 8x8x512x64 attention,
    forward + backward on 2 Zen 4 cores, 80-86 against 108-132 ms; its whole bf16 step 0.88.

    Numerics follow the flash kernel's, not the usual unfused path's: scores come from an FP32 matmul
    and the softmax runs on them in FP32; probabilities are rounded to bf16 for the product with V
    (and kept so); in backward dP = dO V^T is FP32 too, and dS = P (dP - rowsum(dP P)) is rounded to
    bf16 only for the dQ and dK matmuls. Scores or dP in bf16 (Megatron's unfused softmax) were 1.4x
    faster still but lose precision where attention is peaked: with q.k scaled up 64x, 17.5% error in
    the q and k gradients against the flash kernel's 0.7% (3.5% against 0.1% in the output).

    Memory: the bf16 probabilities of every score the blocks compute (:func:`computed_fraction`:
    three quarters of B x H x S x S per layer at Part A = S / 2 and S = 512), instead of the flash
    kernel's logsumexp; one block of one sample's FP32 scores or score gradients at a time.
    """

    @staticmethod
    def forward(ctx, q, k, v, lengths, chunk):  # type: ignore[override]
        b, h, s, d = q.shape
        scale = d ** -0.5
        table = _causal_table(s, torch.float32)
        out = q.new_empty(b, s, h, d).transpose(1, 2)
        ignored = q.new_zeros((), dtype=torch.float32)  # baddbmm's input where beta = 0 (no mask)
        probs = []
        for i, a in enumerate(lengths):
            qf, kf = q[i].float(), k[i].float()
            for q0, q1 in sample_blocks(a, s, chunk):
                qi, ki = qf[:, q0:q1], kf[:, :q1].transpose(-1, -2)
                if q1 <= a:  # Part A: no mask
                    scores = torch.baddbmm(ignored.expand(h, q1 - q0, q1), qi, ki, beta=0.0, alpha=scale)
                else:
                    scores = torch.baddbmm(table[q0:q1, :q1], qi, ki, alpha=scale)
                p = torch.softmax(scores, -1).to(q.dtype)
                out[i, :, q0:q1].baddbmm_(p, v[i, :, :q1], beta=0.0)
                probs.append(p)
        # Saved, not stashed on ctx: selective recomputation's checkpoint must see them to drop them.
        ctx.save_for_backward(q, k, v, *probs)
        ctx.lengths, ctx.chunk = lengths, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, *probs = ctx.saved_tensors
        b, h, s, d = q.shape
        scale = d ** -0.5
        gq = q.new_empty(b, s, h, d).transpose(1, 2)
        # Every block adds to the gradients of the keys it saw, so these start at zero.
        gk, gv = (q.new_zeros(b, s, h, d).transpose(1, 2) for _ in range(2))
        saved = iter(probs)
        for i, a in enumerate(ctx.lengths):
            gof, vf = grad_out[i].float(), v[i].float()
            for q0, q1 in sample_blocks(a, s, ctx.chunk):
                p, go = next(saved), grad_out[i, :, q0:q1]
                dp = torch.matmul(gof[:, q0:q1], vf[:, :q1].transpose(-1, -2))
                # dS = P * (dP - rowsum(dP * P)), the softmax's own backward kernel, in FP32.
                ds = torch._softmax_backward_data(dp, p.float(), -1, torch.float32).to(q.dtype)
                gq[i, :, q0:q1].baddbmm_(ds, k[i, :, :q1], beta=0.0, alpha=scale)
                gk[i, :, :q1].baddbmm_(ds.transpose(-1, -2), q[i, :, q0:q1], alpha=scale)
                gv[i, :, :q1].baddbmm_(p.transpose(-1, -2), go)
        return gq, gk, gv, None, None


@torch.compiler.disable  # host-side Part-A lengths decide the calls: one opaque call for Dynamo
def prefix_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           prefix_lengths: torch.Tensor) -> torch.Tensor:
    """Softmax attention [B, H, S, D] of q, k, v [B, H, S, D] on the CPU under GLM's prefix mask
    (Part A bidirectional, Part B causal), from the Part-A lengths [B]. No dropout. FP32 through the
    CPU flash kernel, bf16 through matmuls that keep the probabilities."""
    lengths = host_lengths(prefix_lengths)
    if q.dtype == torch.float32:
        return _PrefixBlocks.apply(q, k, v, lengths)
    if q.dtype == torch.bfloat16:
        return _PrefixBlocksMatmul.apply(q, k, v, lengths, CHUNK)
    raise ValueError(f"prefix_block_attention takes FP32 or bf16 tensors, not {q.dtype}")
