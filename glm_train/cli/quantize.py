"""glm-quantize: weight-only INT8/INT4 quantization of a checkpoint into a quantized export.

Reads an export, a run dir (its latest checkpoint) or a checkpoint folder of any layout, one tensor
at a time; writes an export folder (model.safetensors with the packed weights and scales, config.json
with "quantization", tokenizer.model) to a temporary sibling and renames it into place once complete.
``load_model(OUTPUT)`` and glm-generate load it as the quantized model. See docs/quantization.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

_DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm-quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="run dir (its latest checkpoint), checkpoint folder or export")
    p.add_argument("--output", required=True, help="quantized export folder to write (replaced only once complete)")
    p.add_argument("--bits", required=True, type=int, help="4 or 8")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale (must divide every quantized layer's input features); "
                        "default: one scale per output row, as GLM-130B")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                   help="dtype of the float tensors (embeddings, LayerNorms, biases); keep: the checkpoint's")
    p.add_argument("--report", action="store_true", help="print the weight bytes per precision")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 on success, 1 with one line on stderr on bad input (nothing written)."""
    args = build_parser().parse_args(argv)
    if args.bits not in (4, 8):
        print(f"glm-quantize: error: --bits must be 4 or 8, not {args.bits}", file=sys.stderr)
        return 1
    if args.group_size is not None and args.group_size <= 0:
        print(f"glm-quantize: error: --group-size must be positive, not {args.group_size}", file=sys.stderr)
        return 1
    import torch
    from safetensors import SafetensorError

    from glm_train.infer.quant import format_report, quantize_export, weight_bytes_report

    t0 = time.perf_counter()
    try:
        dtype = None if _DTYPES[args.dtype] is None else getattr(torch, _DTYPES[args.dtype])
        out = quantize_export(args.input, args.output, args.bits, args.group_size, dtype=dtype)
        if args.report:
            from glm_train.infer.quant import load_quantized

            print(format_report(weight_bytes_report(load_quantized(out))))
    except (FileNotFoundError, ValueError, RuntimeError, OSError, KeyError, SafetensorError) as e:
        print(f"glm-quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-quantize: wrote {out} (INT{args.bits}, "
          f"{'per row' if args.group_size is None else f'group {args.group_size}'}) in "
          f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
