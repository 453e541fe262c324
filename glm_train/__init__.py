"""glm_train: GLM pre-training with 3D parallelism on DeepSpeed, and inference of the result.

``from glm_train import load_model`` loads a trained model (export, run dir or checkpoint of any
layout) for notebooks and scripts; imported lazily so that ``glm_train.config`` stays torch-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from glm_train.infer.loading import load_model

        return load_model
    raise AttributeError(f"module 'glm_train' has no attribute {name!r}")
