"""Tensor-parallel building blocks: column/row-parallel linear and vocab-parallel embedding.

Initialization is layout independent: each parameter's *full* tensor is drawn from a generator
seeded by (seed, the parameter's stable name), and every rank keeps its slice. Runs that differ
only in tp/pp/dp therefore start from the same model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glm_train.parallel.comm import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from glm_train.parallel.state import tp_rank, tp_world_size

InitMethod = Callable[[torch.Tensor, torch.Generator], None]
"""Fills a full (unsharded) tensor in place, drawing from the given generator."""


def stable_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (seed, key) that is the same in every process and Python run."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def normal_init(std: float) -> InitMethod:
    def init(t: torch.Tensor, gen: torch.Generator) -> None:
        t.normal_(0.0, std, generator=gen)

    return init


def xavier_normal_init(gain: float = 1.0, chunks: int = 1, chunk_gains: list[float] | None = None) -> InitMethod:
    """Xavier-normal over ``chunks`` equal row blocks (e.g. fused Q,K,V or gate,up), each its own matrix.

    ``chunk_gains`` multiplies the gain per block (DeepNorm scales V but not Q and K).
    """

    def init(t: torch.Tensor, gen: torch.Generator) -> None:
        out, fan_in = t.shape
        rows = out // chunks
        gains = chunk_gains or [1.0] * chunks
        std = (2.0 / (fan_in + rows)) ** 0.5
        t.normal_(0.0, 1.0, generator=gen)
        for c in range(chunks):
            t[c * rows:(c + 1) * rows].mul_(gain * gains[c] * std)

    return init


def _shard_rows(full: torch.Tensor, interleave: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows: each of ``interleave`` equal blocks is split over ranks and the slices joined."""
    blocks = full.chunk(interleave, dim=0)
    return torch.cat([b.chunk(world, dim=0)[rank] for b in blocks], dim=0)


def _materialize(shape: tuple[int, ...], init: InitMethod, seed: int, key: str) -> torch.Tensor:
    full = torch.empty(shape, dtype=torch.float32)
    gen = torch.Generator().manual_seed(stable_seed(seed, key))
    init(full, gen)
    return full


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split over TP ranks.

    ``interleave`` > 1 splits each of that many row blocks separately, so a fused [gate; up] projection
    gives every rank matching gate and up slices. With ``gather_output`` the full output is returned,
    else each rank's slice.
    """

    def __init__(self, in_features: int, out_features: int, *, init: InitMethod, seed: int, key: str,
                 bias: bool = True, gather_output: bool = False, interleave: int = 1) -> None:
        super().__init__()
        world = tp_world_size()
        if out_features % (world * interleave):
            raise ValueError(f"{key}: output size {out_features} not divisible by tp={world} x {interleave}")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.interleave = gather_output, interleave
        full = _materialize((out_features, in_features), init, seed, key + ".weight")
        self.weight = nn.Parameter(_shard_rows(full, interleave, tp_rank(), world))
        self.bias = nn.Parameter(torch.zeros(out_features // world)) if bias else None
        # Megatron convention: a parameter that is split over TP ranks.
        self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        if self.bias is not None:
            self.bias.tensor_model_parallel = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x), self.weight, self.bias)
        return gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split over TP ranks; partial sums are all-reduced.

    The bias is replicated and added once, after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, *, init: InitMethod, seed: int, key: str,
                 bias: bool = True, input_is_parallel: bool = True) -> None:
        super().__init__()
        world = tp_world_size()
        if in_features % world:
            raise ValueError(f"{key}: input size {in_features} not divisible by tp={world}")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        full = _materialize((out_features, in_features), init, seed, key + ".weight")
        self.weight = nn.Parameter(full.chunk(world, dim=1)[tp_rank()].contiguous())
        self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x)
        y = reduce_from_tp(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split over TP ranks; lookups outside a rank's range give 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init: InitMethod, seed: int,
                 key: str) -> None:
        super().__init__()
        world, rank = tp_world_size(), tp_rank()
        if num_embeddings % world:
            raise ValueError(f"{key}: vocabulary {num_embeddings} not divisible by tp={world}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per = num_embeddings // world
        self.vocab_start, self.vocab_end = rank * per, (rank + 1) * per
        full = _materialize((num_embeddings, embedding_dim), init, seed, key + ".weight")
        self.weight = nn.Parameter(full[self.vocab_start:self.vocab_end].clone())
        self.weight.tensor_model_parallel = True  # type: ignore[attr-defined]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out)

    def logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Tied output head ``h E^T``: this rank's vocabulary slice, or the full logits with ``gather``."""
        local = F.linear(copy_to_tp(hidden), self.weight)
        return gather_from_tp(local) if gather else local
