"""GLM model: plain modules built from the parallel blocks, free of pipeline scheduling."""

from glm_train.model.glm import GLMModel

__all__ = ["GLMModel"]
