"""glm-train: train a GLM model from Hydra overrides."""

from __future__ import annotations

import sys


def train(overrides: list[str]) -> int:
    """Usage: glm-train [--config-name=NAME] [KEY=VALUE ...]
    e.g. glm-train model=toy train.iters=200 run.dir=runs/demo
         glm-train --config-name=demo run.dir=runs/mydemo

    NAME is a file in configs/ (default: config). Keys and their meaning: glm_train/config.py.
    Re-running with the same run.dir resumes from its latest checkpoint.
    """
    from glm_train.config import load_config

    names = [o.split("=", 1)[1] for o in overrides if o.startswith("--config-name=")]
    overrides = [o for o in overrides if not o.startswith("--config-name=")]
    # Validate before anything heavy is imported or any process group exists.
    cfg = load_config(overrides, config_name=names[-1] if names else "config")
    from glm_train.env import setup_environment

    backend = setup_environment()
    from glm_train.train.trainer import Trainer, shutdown

    try:
        Trainer(cfg, backend).fit()
    finally:
        shutdown()
    return 0


def main() -> None:
    from glm_train.cli.common import run_cli

    sys.exit(run_cli(train))


if __name__ == "__main__":
    main()
