"""glm-export: a consolidated safetensors model + config.json + tokenizer from any checkpoint layout."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

_DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm-export", description=__doc__)
    p.add_argument("--input", required=True, help="run dir (its latest checkpoint), checkpoint folder or export")
    p.add_argument("--output", required=True, help="export folder to write (replaced only once complete)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                   help="tensor dtype in the export (keep: the checkpoint's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 on success, 1 with one line on stderr on bad input."""
    args = build_parser().parse_args(argv)
    import torch
    from safetensors import SafetensorError

    from glm_train.convert.export import load_export_tensors, source_tokenizer, write_export

    t0 = time.perf_counter()
    try:
        model_cfg, tensors = load_export_tensors(args.input)
        tok = source_tokenizer(args.input)
        dtype = None if _DTYPES[args.dtype] is None else getattr(torch, _DTYPES[args.dtype])
        out = write_export(args.output, model_cfg, tensors, tokenizer=tok, dtype=dtype,
                           meta={"source": str(args.input)})
    except (FileNotFoundError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        print(f"glm-export: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-export: wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
