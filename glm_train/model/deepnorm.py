"""DeepNorm constants (residual scale alpha, init scale beta)."""

from __future__ import annotations

from glm_train.config import DeepNormVariant


def deepnorm_constants(num_layers: int, variant: DeepNormVariant | str) -> tuple[float, float]:
    """(alpha, beta) for N layers: GLM-130B uses sqrt(2N) and 1/sqrt(2N); DeepNet's decoder
    recipe uses (2N)^(1/4) and (8N)^(-1/4)."""
    variant = DeepNormVariant(variant)
    if variant == DeepNormVariant.glm130b:
        return (2 * num_layers) ** 0.5, (2 * num_layers) ** -0.5
    return (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25
