"""glm-reshard: a checkpoint of any (tp, pp, dp) layout as a layout-free one that any layout can load.

    glm-reshard --input RUN_DIR_OR_STEP_FOLDER --output DIR
    glm-train ... parallel.tp=T parallel.pp=P checkpoint.load=DIR run.dir=NEW_RUN

Weights, FP32 master weights, Adam moments and step counts, the trainer's position (step, consumed
samples, skipped ranges), the data fingerprint and the spike guard's state carry over.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 on success, 1 with one line on stderr on bad input."""
    p = argparse.ArgumentParser(prog="glm-reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="run dir (its latest checkpoint) or checkpoint step folder")
    p.add_argument("--output", required=True, help="layout-free checkpoint folder to write")
    args = p.parse_args(argv)
    from safetensors import SafetensorError

    from glm_train.convert.reshard import to_layout_free

    t0 = time.perf_counter()
    try:
        out = to_layout_free(args.input, args.output)
    except (FileNotFoundError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        print(f"glm-reshard: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-reshard: wrote {out} in {time.perf_counter() - t0:.1f}s; start any layout with "
          f"checkpoint.load={out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
