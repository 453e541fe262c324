"""The FLOP formulas of glm_train/train/flops.py against counts of what the model actually runs.

References: torch's FlopCounterMode (counts every mm/addmm/bmm dispatched, forward, backward and
recomputation alike) on the plain GLMModel and on the real DeepSpeed pipeline module with
activation checkpointing, and a count from the shapes of the model's own weight matrices.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from glm_train.config import ModelConfig
from glm_train.model import GLMModel
from glm_train.model.layer import GLMBlock
from glm_train.model.mask import prefix_lm_mask
from glm_train.model.rope import rope_tables
from glm_train.train.flops import (
    block_forward_flops_per_token,
    hardware_flops_per_token,
    model_flops_per_token,
    recomputed_blocks,
)
from glm_train.train.loss import masked_token_losses

V, B, S = 320, 2, 48


def _cfg(**kw) -> ModelConfig:
    # eager attention: its Q K^T and P V are plain matmuls that FlopCounterMode sees (CPU SDPA is opaque).
    base = dict(vocab_size=V, layers=3, hidden=64, heads=4, seq_length=S, attention_impl="eager")
    base.update(kw)
    return ModelConfig(**base)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    targets = torch.randint(0, V, (B, S), generator=g)
    prefix = torch.tensor([S // 3, S // 2])
    return ids, targets, prefix


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kw", [{}, {"ffn_hidden": 96, "layers": 2}, {"hidden": 96, "heads": 3}])
def test_plain_model_forward_and_training_match_the_formula(kw):
    cfg = _cfg(**kw)
    model = GLMModel(cfg, seed=1)
    ids, targets, prefix = _inputs()
    tokens = B * S
    # GLMModel.forward computes the head at every position: scored_fraction=1.
    forward = _count(lambda: model(ids, prefix_lengths=prefix))
    assert forward == pytest.approx(model_flops_per_token(cfg, S) / 3 * tokens, rel=0, abs=0.5)

    def train_step() -> None:
        masked_token_losses(model(ids, prefix_lengths=prefix), targets).mean().backward()

    assert _count(train_step) == pytest.approx(model_flops_per_token(cfg, S) * tokens, rel=0, abs=0.5)


def test_block_formula_matches_the_weight_shapes_of_the_1b_model():
    # Independent of the formula's algebra: 2 FLOPs per weight per token for every matrix of a real
    # block (the FFN size comes from the model's own construction), plus 4*s*h for attention.
    cfg = ModelConfig(vocab_size=V, layers=24, hidden=2048, heads=32, seq_length=2048)
    block = GLMBlock(cfg, 0, seed=1)
    mats = [p for p in block.parameters() if p.ndim == 2]
    assert len(mats) == 4  # QKV, dense, [gate; up], down
    from_weights = 2 * sum(p.numel() for p in mats) + 4 * cfg.seq_length * cfg.hidden
    assert block_forward_flops_per_token(cfg, cfg.seq_length) == from_weights
    assert cfg.ffn_size() == 5504  # configs/model/glm-1b.yaml's comment
    # The documented ~1.2B: 24 blocks of matrices (the vocabulary comes on top).
    assert 24 * sum(p.numel() for p in mats) == pytest.approx(1.21e9, rel=0.01)
    # The figures quoted in flops.py's docstring (V = 50,432, the MFU benchmark's default).
    cfg.vocab_size = 50432
    assert model_flops_per_token(cfg, 2048) / 1e9 == pytest.approx(9.113, abs=5e-4)
    assert model_flops_per_token(cfg, 2048, 0.5) / 1e9 == pytest.approx(8.803, abs=5e-4)


def test_head_counts_only_the_scored_fraction():
    from glm_train.train.loss import GLMHeadLoss

    cfg = _cfg()
    model = GLMModel(cfg, seed=1)
    hidden = torch.randn(B, S, cfg.hidden, requires_grad=True)
    _, targets, _ = _inputs()
    mask = torch.zeros(B, S)
    mask[0, 20:] = 1
    mask[1, 40:] = 1
    loss_fn = GLMHeadLoss(model.embedding)
    scored = int(mask.sum())
    flops = _count(lambda: loss_fn(hidden, (targets, mask)).backward())
    # Training FLOPs of the head alone: formula with zero layers.
    head_only = model_flops_per_token(_cfg(layers=0), S, scored_fraction=scored / (B * S)) * B * S
    assert flops == pytest.approx(head_only, rel=1e-12)
    assert flops == 3 * 2 * cfg.hidden * V * scored


def test_checkpointed_blocks_add_one_forward_each():
    from torch.utils.checkpoint import checkpoint

    cfg = _cfg()
    model = GLMModel(cfg, seed=1)
    ids, targets, prefix = _inputs()

    def step() -> None:
        h = model.embedding(ids)
        pos = torch.arange(S).expand(B, S)
        cos, sin = rope_tables(pos, cfg.hidden // cfg.heads, cfg.rope_base, False, h.dtype)
        mask = prefix_lm_mask(prefix, S)
        for layer in model.layers:
            # Reentrant, as DeepSpeed's checkpointing: the whole block is recomputed (the non-reentrant
            # variant stops early, once the saved tensors are back, and skips each block's last matmul).
            h = checkpoint(layer, h, cos, sin, mask, use_reentrant=True)
        logits = model.embedding.logits(model.final_layernorm(h))
        masked_token_losses(logits, targets).mean().backward()

    assert _count(step) == pytest.approx(hardware_flops_per_token(cfg, S, 1.0, 1) * B * S, rel=0, abs=0.5)
    assert hardware_flops_per_token(cfg, S, 1.0, 0) == model_flops_per_token(cfg, S)


@pytest.mark.parametrize(("interval", "selective"), [(0, ()), (1, ()), (2, ()), (3, ()), (0, ("attention",)),
                                                      (0, ("geglu",)), (2, ("attention", "geglu"))])
def test_pipeline_recomputation_matches_recomputed_blocks(one_process_group, interval, selective):
    # The real DeepSpeed pipeline module with our checkpointable_layers: which chunks it recomputes
    # is DeepSpeed's rule, counted here by the FLOPs it executes, head on Part B only.
    from glm_train.parallel.topology import ParallelState
    from glm_train.train.pipeline import glm_pipeline

    cfg = _cfg(layers=4)
    par = ParallelState(1, 1, 1)
    module = glm_pipeline(cfg, 1, par.topology, activation_checkpoint_interval=interval,
                          selective_recompute=frozenset(selective))
    module._precompute_checkpointable_values()  # as DeepSpeed's PipelineEngine does on construction
    module.train()
    ids, targets, prefix = _inputs()
    pos = torch.arange(S).expand(B, S).contiguous()
    loss_mask = (torch.arange(S).unsqueeze(0) >= prefix.unsqueeze(1)).float()

    def step() -> None:
        hidden = module((ids, pos, prefix))
        module.loss_fn(hidden, (targets, loss_mask)).backward()

    frac = int(loss_mask.sum()) / (B * S)
    expected = hardware_flops_per_token(cfg, S, frac, interval, selective) * B * S
    assert _count(step) == pytest.approx(expected, rel=1e-9)
    assert recomputed_blocks(4, interval) == {0: 0, 1: 4, 2: 2, 3: 0}[interval]


def test_recomputed_blocks_of_the_1b_layout():
    # [emb, b1..b24, LN, head] in chunks of K: K=1 all 24; K=2 drops b1 (with emb) and b24 (with LN).
    assert [recomputed_blocks(24, k) for k in (0, 1, 2, 3, 4)] == [0, 24, 22, 21, 20]


def test_scored_fraction_is_checked():
    with pytest.raises(ValueError):
        model_flops_per_token(_cfg(), S, scored_fraction=1.5)
    with pytest.raises(ValueError):
        model_flops_per_token(_cfg(vocab_size=None), S)
