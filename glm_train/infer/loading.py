"""Load a trained GLM for inference without DeepSpeed: from a run dir or a checkpoint folder.

DeepSpeed's pipeline checkpoints hold one ``layer_XX-model_YY-model_states.pt`` file per layer and
TP rank; at TP=1 they map one to one onto the plain GLMModel (train/pipeline.py says how).
Files are read one layer at a time, so host memory holds the model plus one layer's tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from glm_train.config import GLMConfig, from_yaml
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.model import GLMModel
from glm_train.train.checkpoint import CheckpointManager
from glm_train.train.layer_map import pipeline_to_model_key

_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, step folder) for a run dir (its latest checkpoint) or a step folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = CheckpointManager(p / "checkpoints", engine=None).latest()
        if latest is None:
            raise FileNotFoundError(f"{p}: run dir has no complete checkpoint (checkpoints/latest missing)")
        return p, latest
    if p.is_dir() and any(_LAYER_FILE.search(f.name) for f in p.iterdir()):
        return p.parent.parent, p
    raise FileNotFoundError(f"{p}: neither a run dir with checkpoints/ nor a checkpoint folder")


def load_trained(path: str | Path, device: str = "cpu") -> tuple[GLMModel, GLMTokenizer, GLMConfig]:
    """The model in eval mode (FP32), its tokenizer and the run's config."""
    run_dir, ckpt = resolve_checkpoint(path)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing; cannot tell the model's shape")
    cfg = from_yaml(cfg_file)
    tok = GLMTokenizer(cfg.data.tokenizer)
    if cfg.model.vocab_size is None or cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"tokenizer {cfg.data.tokenizer} ({tok.vocab_size} ids) does not match the model "
                         f"(vocab {cfg.model.vocab_size})")
    model = GLMModel(cfg.model, seed=cfg.train.seed)
    expected = set(model.state_dict())
    seen: set[str] = set()
    files = sorted(f for f in ckpt.iterdir() if _LAYER_FILE.search(f.name))
    if any(int(_LAYER_FILE.search(f.name).group(2)) != 0 for f in files):  # type: ignore[union-attr]
        raise NotImplementedError(f"{ckpt}: tensor-parallel checkpoints need resharding to tp=1 first")
    for f in files:
        layer = int(_LAYER_FILE.search(f.name).group(1))  # type: ignore[union-attr]
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"cannot read {f}: {e}") from e
        for name, t in sd.items():
            key = pipeline_to_model_key(layer, name, cfg.model.layers)
            if key is None:
                continue
            if key not in expected:
                raise ValueError(f"{f}: unexpected tensor {name} (as {key})")
            model.state_dict()[key].copy_(t.float())
            seen.add(key)
    missing = expected - seen
    if missing:
        raise ValueError(f"{ckpt}: checkpoint lacks {sorted(missing)[:5]}...")
    return model.to(device).eval(), tok, cfg
