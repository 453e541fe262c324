"""Load a trained GLM for inference without DeepSpeed: from an export, a run dir or a checkpoint folder
of any (tp, pp) layout (convert/export.py reads them all).

The model is built on the meta device (no random initialization, no memory) and materialized empty;
then tensors are read and copied in one at a time, so host memory holds the model plus one tensor
(one layer's shards for a TP checkpoint).

Tensor-parallel inference: with a TP group registered (parallel/state.py) every rank builds its
shard of the model and keeps its slice of each full tensor (``split_tp``, the rules of the parallel
layers), whatever layout the checkpoint was written in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glm_train.config import GLMConfig, ModelConfig
from glm_train.convert.export import (
    checkpoint_config,
    is_export,
    load_export_tensors,
    resolve_checkpoint,
    source_tokenizer,
    split_tp,
)
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.model import GLMModel
from glm_train.parallel import state as tp_state

__all__ = ["load_model", "load_trained", "resolve_checkpoint"]


def _fill(model_cfg: ModelConfig, tensors, device: str | torch.device, dtype: torch.dtype,
          where: str) -> GLMModel:
    with torch.device("meta"):
        model = GLMModel(model_cfg)
    model.to_empty(device=device)
    target = model.state_dict()
    seen: set[str] = set()
    for key, t in tensors:
        if key not in target:
            raise ValueError(f"{where}: unexpected tensor {key} for this model config")
        if tuple(t.shape) != tuple(target[key].shape):
            raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, the model config expects "
                             f"{tuple(target[key].shape)} (a checkpoint of another model config?)")
        target[key].copy_(t)
        seen.add(key)
    missing = sorted(set(target) - seen)
    if missing:
        raise ValueError(f"{where}: lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.to(dtype).eval()


def _tp_layout(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    """(rank, size) of this process in its TP group; given values must agree with the registered group,
    since the model's shard shapes come from it."""
    size, rank = tp_state.tp_world_size(), tp_state.tp_rank()
    if (tp_size is not None and tp_size != size) or (tp_rank is not None and tp_rank != rank):
        raise ValueError(f"tp_rank={tp_rank}, tp_size={tp_size} requested but this process is rank {rank} of a "
                         f"TP group of {size}: initialize torch.distributed and call "
                         "glm_train.parallel.state.set_tensor_parallel_group(group) first")
    return rank, size


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
               tp_rank: int | None = None, tp_size: int | None = None) -> GLMModel:
    """The model in eval mode from an export, a run dir (its latest checkpoint) or a checkpoint folder.

    ``model(input_ids, position_ids=None, prefix_lengths=None)`` returns logits [B, S, V];
    ``prefix_lengths`` holds each sample's Part-A length (bidirectional), position_ids default to 0..S-1.

    Under a registered TP group (``set_tensor_parallel_group``) this rank's shard is loaded; ``tp_rank``
    and ``tp_size``, when given, are checked against that group.
    A quantized export (glm-quantize) loads straight into its quantized model (infer/quant.py).
    """
    from glm_train.infer.quant import is_quantized_export, load_quantized

    if is_quantized_export(path):
        _tp_layout(tp_rank, tp_size)
        return load_quantized(path, device, dtype)
    model_cfg, tensors = load_export_tensors(path)
    rank, size = _tp_layout(tp_rank, tp_size)
    if size > 1:
        tensors = ((key, split_tp(key, t, rank, size)) for key, t in tensors)
    return _fill(model_cfg, tensors, device, dtype, str(path))


def load_trained(path: str | Path, device: str = "cpu", *, tp_rank: int | None = None,
                 tp_size: int | None = None) -> tuple[GLMModel, GLMTokenizer, GLMConfig | None]:
    """(model in eval mode, FP32; its tokenizer; the run's config, None for an export)."""
    tok_path = source_tokenizer(path)
    if tok_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer found (exports carry tokenizer.model; runs name theirs in "
                                "config.yaml)")
    tok = GLMTokenizer(tok_path)
    model = load_model(path, device, tp_rank=tp_rank, tp_size=tp_size)
    if model.cfg.vocab_size is None or model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer {tok_path} ({tok.vocab_size} ids) does not match the model "
                         f"(vocab {model.cfg.vocab_size})")
    cfg = None if is_export(path) else checkpoint_config(resolve_checkpoint(path)[0])
    return model, tok, cfg
