"""Load a trained GLM for inference without DeepSpeed: from an export, a run dir or a checkpoint folder
of any (tp, pp) layout (convert/export.py reads them all).

The model is built on the meta device (no random initialization, no memory) and materialized empty;
then tensors are read and copied in one at a time, so host memory holds the model plus one tensor
(one layer's shards for a TP checkpoint).
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
)
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.model import GLMModel

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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GLMModel:
    """The model in eval mode from an export, a run dir (its latest checkpoint) or a checkpoint folder.

    ``model(input_ids, position_ids=None, prefix_lengths=None)`` returns logits [B, S, V];
    ``prefix_lengths`` holds each sample's Part-A length (bidirectional), position_ids default to 0..S-1.
    """
    model_cfg, tensors = load_export_tensors(path)
    return _fill(model_cfg, tensors, device, dtype, str(path))


def load_trained(path: str | Path, device: str = "cpu") -> tuple[GLMModel, GLMTokenizer, GLMConfig | None]:
    """(model in eval mode, FP32; its tokenizer; the run's config, None for an export)."""
    tok_path = source_tokenizer(path)
    if tok_path is None:
        raise FileNotFoundError(f"{path}: no tokenizer found (exports carry tokenizer.model; runs name theirs in "
                                "config.yaml)")
    tok = GLMTokenizer(tok_path)
    model = load_model(path, device)
    if model.cfg.vocab_size is None or model.cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer {tok_path} ({tok.vocab_size} ids) does not match the model "
                         f"(vocab {model.cfg.vocab_size})")
    cfg = None if is_export(path) else checkpoint_config(resolve_checkpoint(path)[0])
    return model, tok, cfg
