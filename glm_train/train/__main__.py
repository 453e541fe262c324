"""``deepspeed [--num_gpus N] --module glm_train.train [KEY=VALUE ...]``: the DeepSpeed launcher's entry.

The launcher appends ``--local_rank=N`` to every rank's arguments; Hydra would read it as a bad
override, so it is stripped here (its value fills LOCAL_RANK if the environment lacks it) and the
rest goes to ``glm-train`` unchanged.
"""

from __future__ import annotations

import os
import sys

_FLAGS = ("--local_rank", "--local-rank")


def strip_local_rank(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--local_rank=N`` / ``--local_rank N`` (and the dashed spelling); return (rest, N)."""
    rest: list[str] = []
    local_rank: str | None = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS:
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {arg} needs a value")
            local_rank = argv[i + 1]
            i += 2
            continue
        name, sep, value = arg.partition("=")
        if sep and name in _FLAGS:
            local_rank = value
        else:
            rest.append(arg)
        i += 1
    return rest, local_rank


def main(argv: list[str] | None = None) -> int:
    """Strip the launcher's rank flag and run ``glm-train`` with the remaining overrides."""
    from glm_train.cli.common import run_cli
    from glm_train.cli.train import train

    rest, local_rank = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    # DeepSpeed's launcher exports LOCAL_SIZE, not torchrun's LOCAL_WORLD_SIZE, which sizes the
    # per-rank CPU thread count in glm_train.env.
    if "LOCAL_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["LOCAL_SIZE"])
    return run_cli(train, rest)


if __name__ == "__main__":
    sys.exit(main())
