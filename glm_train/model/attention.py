"""Multi-head self-attention with fused QKV, RoPE and the GLM prefix mask, and the KV cache of decoding."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils.checkpoint import checkpoint

from glm_train.config import AttentionImpl, ModelConfig, PositionEncoding
from glm_train.model import prefix_blocks
from glm_train.model.mask import host_lengths, prefix_lm_mask
from glm_train.model.rope import rotary_qkv
from glm_train.parallel.layers import ColumnParallelLinear, RowParallelLinear, xavier_normal_init
from glm_train.parallel.random import TP_RANDOM
from glm_train.parallel.state import tp_world_size


@functools.cache
def cpu_bf16_isa() -> str | None:
    """The CPU's native bf16 dot-product instructions, as PyTorch's kernels see them: ``"amx"`` (AMX
    tiles), ``"avx512_bf16"`` (VDPBF16PS: Cooper Lake, Zen 4), or None (bf16 converted to FP32)."""
    probes = (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, probe in probes:
        try:
            if bool(getattr(torch.cpu, probe)()):
                return name
        except (AttributeError, RuntimeError):  # private APIs: absent means no evidence of support
            continue
    return None


def cpu_attention_upcasts(dtype: torch.dtype) -> bool:
    """Whether half-precision attention on this CPU runs in FP32 (``SelfAttention``): yes, unless the
    CPU has native bf16 dot products (:func:`cpu_bf16_isa`). Without them, PyTorch's CPU flash kernel
    is slower in bf16 than in fp32 (2 cores, 8x8x512x64 with the prefix mask, forward + backward: 175
    against 105 ms, the casts included); with AMX the bf16 kernel is the faster one (57 against 83
    ms), with AVX512-BF16 too (Zen 4: 118 against 140 ms, medians of 22 alternating calls). fp16
    always upcasts."""
    if dtype == torch.bfloat16:
        return cpu_bf16_isa() is None
    return dtype == torch.float16


class KVCache:
    """Keys and values of every layer for incremental decoding (inference only).

    Rotated keys and values [B, H, T, D] are written into buffers of ``capacity`` slots, allocated
    at a layer's first write; each call appends the new columns and returns all slots written so
    far. The slot order is the order in which tokens were fed (Part A first, then Part B one token
    per step); which slot a query may see is the caller's attention mask, not the cache's business.
    """

    def __init__(self, num_layers: int, capacity: int) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Slots written (by the first layer; all layers agree between forwards)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, H, S, D] for ``layer``; return the keys and values of all its slots."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} slots needed, capacity {self.capacity}")
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_empty(b, h, self.capacity, d)
            self.values[layer] = v.new_empty(b, h, self.capacity, d)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (beam search reordering; may repeat or change B)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None and v is not None:
                self.keys[i] = k.index_select(0, index)
                self.values[i] = v.index_select(0, index)


class SelfAttention(nn.Module):
    """Fused [Q; K; V] projection (column-parallel, heads split over TP ranks), output projection
    (row-parallel). DeepNorm's beta scales the V and output initializations, not Q and K."""

    def __init__(self, cfg: ModelConfig, layer_number: int, beta: float, seed: int,
                 recompute: bool = False) -> None:
        super().__init__()
        d = cfg.hidden
        self.layer_number = layer_number
        self.recompute = recompute
        self.heads = cfg.heads // tp_world_size()
        self.head_dim = d // cfg.heads
        self.impl = AttentionImpl(cfg.attention_impl)
        self.two_d = PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d
        self.attention_dropout = cfg.attention_dropout
        prefix = f"layers.{layer_number}.attention"
        self.qkv = ColumnParallelLinear(d, 3 * d, init=xavier_normal_init(1.0, 3, [1.0, 1.0, beta]),
                                        seed=seed, key=prefix + ".qkv", interleave=3)
        self.dense = RowParallelLinear(d, d, init=xavier_normal_init(beta), seed=seed, key=prefix + ".dense")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """``mask`` [B, 1, S, T] (True: visible); T = S without a cache, else the cache's slots after
        this call's S new ones are appended. Or, for the split kernel, the Part-A lengths [B]
        (:func:`glm_train.model.mask.attention_mask`)."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim)
        if cache is None and self.recompute and torch.is_grad_enabled():
            # Selective recomputation: keep the projection output and rebuild the rotated q, k, the
            # copy of v, the kernel's saved state and (eager path) the S x S scores in backward.
            # The default RNG stream is restored for the replay, so TP_RANDOM replays the dropout.
            ctx = checkpoint(self._core, qkv, cos, sin, mask, None, use_reentrant=False)
        else:
            ctx = self._core(qkv, cos, sin, mask, cache)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def _core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
              cache: KVCache | None) -> torch.Tensor:
        """RoPE and the attention kernel: the projection [B,S,3,H,D] to the context [B,H,S,D]."""
        q, k, v = rotary_qkv(qkv, cos, sin, self.two_d)
        if cache is not None:
            k, v = cache.update(self.layer_number, k, v)
        p = self.attention_dropout if self.training else 0.0
        if p == 0.0:
            # No randomness: skip the RNG fork, which would also break a torch.compile graph.
            return self._kernel(q, k, v, mask, p)
        # Heads are sharded over TP ranks: their dropout masks come from the per-rank stream.
        with TP_RANDOM.fork():
            return self._kernel(q, k, v, mask, p)

    def _kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                p: float) -> torch.Tensor:
        if self.impl == AttentionImpl.eager and mask.dtype == torch.bool:
            return self._eager(q, k, v, mask, p)
        dtype = q.dtype
        if q.device.type == "cpu" and cpu_attention_upcasts(dtype):
            # The faster CPU kernel where the CPU has no native bf16 dot products, and fp32 only adds
            # precision; GPUs keep the half-precision kernels.
            q, k, v = q.float(), k.float(), v.float()
        if mask.dtype != torch.bool:  # Part-A lengths: split or blocks (mask.attention_mask)
            if q.device.type != "cpu" or self.impl.resolve(q.device) == AttentionImpl.split:
                # Under selective recomputation _core runs inside a non-reentrant checkpoint.
                return split_prefix_attention(q, k, v, mask, p, own_backward=not self.recompute).to(dtype)
            if prefix_blocks.runs(q.dtype, p, q.shape[1], q.shape[2]):
                return prefix_blocks.prefix_block_attention(q, k, v, mask).to(dtype)
            # fp16, dropout, too little work per sample, or FP32 with more threads than heads.
            mask = prefix_lm_mask(mask, q.shape[2])
        # SDPA kernels accumulate the softmax in FP32 whatever the input dtype, which is what
        # query-key layer scaling protects in the eager path.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).to(dtype)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               p: float) -> torch.Tensor:
        # Query-key layer scaling (GLM-130B): shrink q by (layer+1) before the matmul so FP16 scores
        # cannot overflow, and undo it in FP32 before the softmax.
        coeff = float(self.layer_number + 1)
        scores = torch.matmul(q / (self.head_dim ** 0.5 * coeff), k.transpose(-1, -2)).float() * coeff
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        if p > 0:
            probs = F.dropout(probs, p=p)
        return torch.matmul(probs, v)


@torch.compiler.disable  # data-dependent (Part-A lengths on the host): one opaque call, not 7 graph breaks
def split_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_lengths: torch.Tensor,
                           dropout_p: float = 0.0, own_backward: bool = True) -> torch.Tensor:
    """GLM attention (Part A bidirectional, Part B causal) from two mask-free SDPA calls.

    A Part-B query sees every key up to itself, Part A included, which is exactly causal attention;
    a Part-A query sees Part A and nothing else, which is unmasked attention over Part A. Neither call
    needs a mask tensor, so CUDA can run both on FlashAttention, which a boolean mask rules out. Costs
    the causal pass plus sum(a_b^2) per head, against the masked kernel's full S x S.

    Returns [B, H, S, D] in the [B, S, H, D] memory layout that the output projection reads. With
    gradients, by :class:`_SplitPrefixAttention` unless ``own_backward`` is False, which a caller
    inside a non-reentrant ``torch.utils.checkpoint`` must pass (its saved-tensor hooks would also
    take the function's inner graph); there autograd's composition of the two calls runs instead,
    its output concatenated in [B, H, S, D] order.
    """
    lengths = host_lengths(prefix_lengths)  # one host sync per micro-batch, not per block or sample
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        _, causal, parts = _split_calls(q, k, v, lengths, dropout_p)
        return _assemble(causal, parts)
    if own_backward:
        return _SplitPrefixAttention.apply(q, k, v, lengths, dropout_p)
    _, causal, parts = _split_calls(q, k, v, lengths, dropout_p)
    return _concatenate(causal, parts)


_Part = tuple[slice, int, list[torch.Tensor], Any]  # batch rows, Part-A length, inputs, output (or its edge)


def _split_calls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Sequence[int], dropout_p: float,
                 leaves: bool = False) -> tuple[list[torch.Tensor], torch.Tensor, list[_Part]]:
    """The causal call over all rows (its inputs and output) and the Part-A calls: one batched call
    when every sample has the same Part A (packed or synthetic batches; B calls of one sample each
    leave a GPU's multiprocessors partly idle), else one per sample with a Part A. Called in this
    order (causal first) on every path, so dropout draws the same masks. ``leaves``: each call's
    inputs are new autograd leaves, views of q, k, v, so each call's gradients come back as their
    own tensors."""
    def inputs(rows: slice, a: int | None) -> list[torch.Tensor]:
        views = [t[rows, :, :a] for t in (q, k, v)]
        return [t.detach().requires_grad_() for t in views] if leaves else views

    full = inputs(slice(None), None)
    causal = F.scaled_dot_product_attention(*full, is_causal=True, dropout_p=dropout_p)
    a = lengths[0]
    if a > 0 and all(x == a for x in lengths):
        groups = [(slice(None), a)]
    else:
        groups = [(slice(b, b + 1), a) for b, a in enumerate(lengths) if a > 0]
    parts = []
    for rows, a in groups:
        args = inputs(rows, a)
        parts.append((rows, a, args, F.scaled_dot_product_attention(*args, dropout_p=dropout_p)))
    return full, causal, parts


def _assemble(causal: torch.Tensor, parts: list[_Part]) -> torch.Tensor:
    """Part-A rows from the Part-A calls, the rest from the causal call, written into a [B, S, H, D]
    buffer: the output projection's input layout, so its reshape copies nothing."""
    b, h, s, d = causal.shape
    out = causal.new_empty(b, s, h, d).transpose(1, 2)
    done: set[int] = set()
    for rows, a, _, part in parts:
        out[rows, :, :a] = part.detach()
        out[rows, :, a:] = causal[rows, :, a:].detach()
        done.update(range(b)[rows])
    for i in range(b):
        if i not in done:  # no Part A: the causal call's rows whole
            out[i] = causal[i].detach()
    return out


def _concatenate(causal: torch.Tensor, parts: list[_Part]) -> torch.Tensor:
    """:func:`_assemble` in autograd's own ops (slices and concatenations), for callers inside a
    non-reentrant checkpoint."""
    if len(parts) == 1 and parts[0][0] == slice(None):
        _, a, _, part = parts[0]
        return torch.cat([part, causal[:, :, a:]], dim=2)
    by_row = {rows.start: (a, part) for rows, a, _, part in parts}
    return torch.cat([torch.cat([by_row[i][1], causal[i:i + 1, :, by_row[i][0]:]], dim=2) if i in by_row
                      else causal[i:i + 1] for i in range(causal.shape[0])], dim=0)


@functools.cache
def _grad_takes_edges() -> bool:
    """Whether ``torch.autograd.grad`` takes a gradient edge for an output (added in mid-2024, after
    torch 2.4 branched, as far as known); where it does not, the output itself is held."""
    x = torch.zeros(1, requires_grad=True)
    try:
        with torch.enable_grad():  # the first caller may be a Function's forward (no grad there)
            torch.autograd.grad(get_gradient_edge(x * 2), x, torch.ones(1))
    except (TypeError, RuntimeError, AttributeError):
        return False
    return True


class _SplitPrefixAttention(torch.autograd.Function):
    """The two calls of :func:`split_prefix_attention`, with a backward that adds the Part-A calls'
    gradients into the causal call's in place.

    Autograd's composition of the two calls (slices, then a concatenation) pads every Part-A gradient
    and the causal call's output gradient to full length with zeros, then adds full-length tensors:
    for q, k and v, per block, a zero fill, a copy and an addition, about 17 passes over a [B, H, S, D]
    tensor where 6 are needed. In an H200's profile of glm-1b (compiled, micro-batch 24) those kernels
    took about 48 ms of a 966 ms step. The calls and their kernels are the same ones, each call's
    backward is autograd's own (run on the call's inner graph, built in forward), and the sums are the
    same additions, so values and gradients are bitwise those of the composition.
    """

    @staticmethod
    def forward(ctx, q, k, v, lengths, dropout_p):  # type: ignore[override]
        with torch.enable_grad():
            full, causal, parts = _split_calls(q, k, v, lengths, dropout_p, leaves=True)
        out = _assemble(causal, parts)
        # Held until backward, which drops them: each call's inputs (views of q, k, v) and its
        # output's gradient edge, not the output, which only a kernel that needs it keeps (CUDA's).
        edge = get_gradient_edge if _grad_takes_edges() else (lambda o: o)
        ctx.parts = [(slice(None), 0, full, edge(causal))] + [(rows, a, args, edge(o)) for rows, a, args, o in parts]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        parts = ctx.parts
        if parts is None:
            raise RuntimeError("split_prefix_attention's backward runs once per forward (no retain_graph)")
        ctx.parts = None
        (_, _, full, causal), rest = parts[0], parts[1:]
        # The causal call's output counts for the Part-B rows only: its gradient is zero elsewhere.
        grad_causal = grad_out.clone()
        for rows, a, _, _ in rest:
            grad_causal[rows, :, :a] = 0
        grads = list(torch.autograd.grad(causal, full, grad_causal))
        for rows, a, args, part in rest:
            for total, g in zip(grads, torch.autograd.grad(part, args, grad_out[rows, :, :a]), strict=True):
                total[rows, :, :a] += g
        return *grads, None, None
