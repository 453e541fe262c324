"""Shared CLI plumbing: Hydra-style overrides in, a clear message and a non-zero exit on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_cli(fn: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Call ``fn(overrides)``; turn configuration and input errors into one line on stderr and exit 2."""
    from glm_train.config import ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print((fn.__doc__ or "").strip())
        return 0
    try:
        return int(fn(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
