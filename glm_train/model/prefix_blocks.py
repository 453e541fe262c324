"""GLM's prefix attention on CPU without computing the keys the mask hides.

The masked SDPA kernel scores every query against every key and then throws away what the prefix
mask hides; on a CPU that is real time (the kernel's causal mode skips nothing at S <= 512, its key
block being the whole sequence). Here each sample runs as a few calls of the same kernel, each over
only the keys its queries can see:

- Part A's queries against Part A's keys, with no mask at all;
- Part B's queries in near-equal chunks of at most ``CHUNK``, each against the keys up to its own
  last query, under a causal mask that is a view into one cached [S, S] table.

With Part A between a quarter and three quarters of the sequence that is about 70% of the masked
kernel's work. The model FLOPs do not change (attention counts the full S x S, as Megatron's and
nanoGPT's formulas do). Values equal the masked kernel's to rounding: the softmax sums run over the
same visible terms, in other blocks.
"""

from __future__ import annotations

import functools

import torch

# The CPU flash-attention kernel and its backward, as SDPA calls them.
_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Most queries per Part-B call. The kernel splits a call's queries into blocks of 64 from 192 queries
# on (32 below, which ran slower per score); 128 and 256 timed the same in fp32.
CHUNK = 256


def available() -> bool:
    """Whether this torch exposes the CPU kernel this module calls."""
    return _FORWARD is not None and _BACKWARD is not None


def pays_off(heads: int) -> bool:
    """Whether the per-sample calls beat one masked call on this process's threads.

    The kernel's backward runs one task per (sample, head), so a call for one sample keeps at most
    ``heads`` threads busy, where the masked call over the whole batch keeps all of them busy. With
    more threads than heads the skipped keys no longer pay for the idle threads (2 threads: 1 head
    26.7 against 18.0 ms masked, 2 heads 28.5 against 35.6, for 8x512x64 per head, fp32 forward and
    backward).
    """
    return available() and torch.get_num_threads() <= heads


def runs(dtype: torch.dtype, dropout_p: float, heads: int) -> bool:
    """Whether ``attention_impl=blocks`` runs this module for attention in ``dtype`` with this dropout
    and this many heads (per TP rank); where not, the masked kernel does (model/attention.py).
    FP32 only (see :func:`prefix_block_attention`), no dropout (the CPU kernel has none)."""
    return dtype == torch.float32 and dropout_p == 0.0 and pays_off(heads)


def sample_blocks(prefix: int, seq_len: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(first query, end of queries) of one sample's calls: Part A's if it has one, then Part B's
    chunks, near-equal so that none is left with a handful of queries. A call sees the keys up to
    the end of its queries; the last call sees every key."""
    a = min(max(prefix, 0), seq_len)
    rest = seq_len - a
    n = -(-rest // chunk)
    bounds = [a + rest * i // n for i in range(n + 1)] if n else []
    return ([(0, a)] if a > 0 else []) + list(zip(bounds, bounds[1:]))


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


@torch.compiler.disable  # host-side Part-A lengths decide the calls: one opaque call for Dynamo
def prefix_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           prefix_lengths: torch.Tensor) -> torch.Tensor:
    """Softmax attention [B, H, S, D] of FP32 q, k, v [B, H, S, D] on the CPU under GLM's prefix mask
    (Part A bidirectional, Part B causal), from the Part-A lengths [B]. No dropout: the CPU kernel
    has none. Half precision is left to the masked kernel: its CPU backward runs slower per score
    over short key ranges (bf16 on AVX512-BF16: 38-51 against 32 us per million scores), which
    ate the saving (a masked 8x8x512x64 forward + backward: 121 against 116 ms)."""
    if q.dtype != torch.float32:
        raise ValueError(f"prefix_block_attention takes FP32 tensors, not {q.dtype}")
    return _PrefixBlocks.apply(q, k, v, prefix_lengths.tolist())
