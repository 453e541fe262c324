"""glm-import-sat / glm-export-sat: SwissArmyTransformer (GLM-130B release) checkpoints to and from the
consolidated export (docs/sat.md)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ERRORS = (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError)


def build_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm-import-sat",
        description="Convert a SwissArmyTransformer GLM checkpoint (GLM-130B's released format: "
                    "mp_rank_XX_model_states.pt per TP rank) into a glm_train export folder.")
    p.add_argument("--input", required=True,
                   help="folder holding mp_rank_XX_model_states.pt, or its parent with a 'latest' file")
    p.add_argument("--output", required=True, help="export folder to write (replaced only once complete)")
    p.add_argument("--num-attention-heads", type=int, default=None,
                   help="attention heads (not recorded in SAT files; default: the --model-config's, else 96)")
    p.add_argument("--model-config", default=None,
                   help="model yaml (configs/model/*.yaml style) for the options SAT files do not carry; "
                        "default: configs/model/glm-130b.yaml")
    p.add_argument("--tokenizer", default=None, help="tokenizer file copied into the export as tokenizer.model")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                   help="tensor dtype of the export (keep: the checkpoint's)")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm-export-sat",
        description="Write a SwissArmyTransformer GLM checkpoint (mp_rank_XX_model_states.pt per TP rank, "
                    "straight into --output) from an export, a run dir or a checkpoint folder.")
    p.add_argument("--input", required=True, help="export folder, run dir (its latest checkpoint) or checkpoint folder")
    p.add_argument("--output", required=True, help="folder for the mp_rank_XX files (replaced only once complete)")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size of the SAT checkpoint")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                   help="tensor dtype of the SAT files (keep: the input's; GLM-130B's release is fp16)")
    p.add_argument("--single-pass", action="store_true",
                   help="read the input once, holding all ranks (the whole model) in memory; default: one "
                        "read of the input per rank, holding one rank's shards")
    return p


def _dtype(name: str):
    import torch

    return None if _DTYPES[name] is None else getattr(torch, _DTYPES[name])


def _heads(args: argparse.Namespace, overrides: dict) -> int:
    if args.num_attention_heads is not None:
        return int(args.num_attention_heads)
    return int(overrides.get("heads") or 96)


def import_main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of glm-import-sat: 0 on success, 1 with one line on stderr on bad input."""
    args = build_import_parser().parse_args(argv)
    from glm_train.convert.export import is_export, write_export
    from glm_train.convert.sat import describe, load_model_yaml, read_sat, resolve_sat_dir

    t0 = time.perf_counter()
    try:
        out = Path(args.output)
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or is_export(out))):
            raise FileExistsError(f"{out}: exists and is not an export folder; refusing to replace it")
        overrides = load_model_yaml(args.model_config) if args.model_config else {}
        if args.tokenizer is not None and not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"{args.tokenizer}: tokenizer not found")
        heads = _heads(args, overrides)
        model_cfg, tensors = read_sat(args.input, heads, model_overrides=overrides)
        folder, files, iteration = resolve_sat_dir(args.input)
        print(f"glm-import-sat: {folder}: {len(files)} shard(s); {describe(model_cfg)}", file=sys.stderr)
        meta = {"source": "sat", "sat_dir": str(folder.resolve()), "sat_tp": len(files),
                "sat_iteration": iteration, "num_attention_heads": heads,
                "model_config": str(args.model_config) if args.model_config else "configs/model/glm-130b.yaml"}
        write_export(out, model_cfg, tensors, tokenizer=args.tokenizer, dtype=_dtype(args.dtype), meta=meta)
    except _ERRORS as e:
        print(f"glm-import-sat: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-import-sat: wrote {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of glm-export-sat: 0 on success, 1 with one line on stderr on bad input."""
    args = build_export_parser().parse_args(argv)
    from glm_train.convert.export import load_export_tensors
    from glm_train.convert.sat import check_sat_tp, describe, sat_incompatibilities, write_sat

    t0 = time.perf_counter()
    dtype = _dtype(args.dtype)

    def cast(items):
        for key, t in items:
            yield key, (t.to(dtype) if dtype is not None and t.is_floating_point() else t)

    try:
        model_cfg, tensors = load_export_tensors(args.input)
        check_sat_tp(model_cfg, args.tp)
        print(f"glm-export-sat: {args.input}: {describe(model_cfg)}; writing tp={args.tp}", file=sys.stderr)
        for note in sat_incompatibilities(model_cfg):
            print(f"glm-export-sat: note: {note}; run SAT with the same option", file=sys.stderr)
        if args.single_pass or args.tp == 1:
            source = cast(tensors)
        else:
            first = [tensors]

            def source():  # one fresh read of the input per rank (the first reuses the open one)
                return cast(first.pop() if first else load_export_tensors(args.input)[1])

        out = write_sat(model_cfg, source, args.tp, args.output)
    except _ERRORS as e:
        print(f"glm-export-sat: error: {e}", file=sys.stderr)
        return 1
    print(f"glm-export-sat: wrote {args.tp} shard(s) to {out} in {time.perf_counter() - t0:.1f}s "
          f"(for SAT's loader: put them in <ckpt>/<iteration>/ with <ckpt>/latest naming the iteration)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(import_main())
