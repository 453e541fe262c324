"""Multi-head self-attention with fused QKV, RoPE and the GLM prefix mask, and the KV cache of decoding."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from glm_train.config import AttentionImpl, ModelConfig, PositionEncoding
from glm_train.model import prefix_blocks
from glm_train.model.mask import prefix_lm_mask
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
                return split_prefix_attention(q, k, v, mask, p).to(dtype)
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
                           dropout_p: float = 0.0) -> torch.Tensor:
    """GLM attention (Part A bidirectional, Part B causal) from two mask-free SDPA calls.

    A Part-B query sees every key up to itself, Part A included, which is exactly causal attention;
    a Part-A query sees Part A and nothing else, which is unmasked attention over Part A. Neither call
    needs a mask tensor, so CUDA can run both on FlashAttention, which a boolean mask rules out. Costs
    the causal pass plus sum(a_b^2) per head, against the masked kernel's full S x S.
    """
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    lengths = prefix_lengths.tolist()  # one host sync per call, not per sample
    a = lengths[0]
    if a > 0 and all(x == a for x in lengths):
        # One Part A length for the whole batch (packed or synthetic batches): one batched call
        # instead of B calls of one sample each, which leave a GPU's multiprocessors partly idle.
        part_a = F.scaled_dot_product_attention(q[:, :, :a], k[:, :, :a], v[:, :, :a], dropout_p=dropout_p)
        return torch.cat([part_a, causal[:, :, a:]], dim=2)
    rows = []
    for b, a in enumerate(lengths):
        if a <= 0:
            rows.append(causal[b:b + 1])
            continue
        part_a = F.scaled_dot_product_attention(q[b:b + 1, :, :a], k[b:b + 1, :, :a], v[b:b + 1, :, :a],
                                                dropout_p=dropout_p)
        rows.append(torch.cat([part_a, causal[b:b + 1, :, a:]], dim=2))
    return torch.cat(rows, dim=0)
