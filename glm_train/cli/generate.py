"""glm-generate: load a checkpoint and continue a prompt."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from glm_train.infer.generate import SamplingConfig


@dataclass
class GenerateConfig:
    """Arguments of glm-generate (KEY=VALUE)."""

    checkpoint: str = "runs/demo"
    """A run dir (its latest checkpoint) or a checkpoint folder."""
    prompt: str = "In the beginning"
    """Text to continue (English or Chinese)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings, e.g. sampling.temperature=0.7 sampling.max_new_tokens=100."""


def generate_cli(overrides: list[str]) -> int:
    """Usage: glm-generate checkpoint=RUN_DIR prompt="..." [sampling.temperature=0.8 sampling.top_k=40
    sampling.top_p=0.95 sampling.repetition_penalty=1.3 sampling.max_new_tokens=64 sampling.seed=0]
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from glm_train.config import ConfigError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key: {getattr(e, 'full_key', '?')})") from None
    assert isinstance(cfg, GenerateConfig)
    from glm_train.infer.generate import generate
    from glm_train.infer.loading import load_trained

    model, tok, _ = load_trained(cfg.checkpoint)
    text = generate(model, tok, cfg.prompt, cfg.sampling)
    print(cfg.prompt + text)
    return 0


def main() -> None:
    from glm_train.cli.common import run_cli

    sys.exit(run_cli(generate_cli))


if __name__ == "__main__":
    main()
