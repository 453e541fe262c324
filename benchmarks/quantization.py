"""Quantization benchmark: ``python benchmarks/quantization.py [--checkpoint PATH] [--json FILE]``.

On a demo-trained model (default ``runs/demo``; nothing is trained here), for float, INT8 and INT4
(per-row absmax, as GLM-130B) and, as an extension, INT4 with group-wise scales:

* perplexity on the held-out English and Chinese text (``data/demo/en_val``, ``zh_val``), measured
  exactly as the trainer's validation loss (glm_train/data/dataset.py ValidationSet): consecutive
  windows of ``seq_length - 2`` tokens, the first half + [gMASK] as bidirectional Part A, the second
  half predicted in Part B; ppl = exp(token-weighted mean CE of the Part-B text tokens, the final
  <eop> not scored). The same scorer and the same samples for every variant;
* bytes of the quantized linear layers' weights (+ scales) against the same weights in BF16.

Targets (issue 7): INT8 ppl within 0.5% of float and INT4 within 3%, both languages; linear-layer
bytes INT8 <= 0.51x and INT4 <= 0.27x of BF16. Prints a table; ``--json FILE`` writes the flat dict
(keys ``ppl_en_float``, ``ppl_en_int8``, ``int8_ppl_rel_en``, ``bytes_ratio_int8``, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from glm_train.config import PositionEncoding  # noqa: E402
from glm_train.data.blank_infilling import SpecialIds  # noqa: E402
from glm_train.data.dataset import ValidationSet, collate  # noqa: E402
from glm_train.data.indexed import IndexedDataset, check_fingerprint  # noqa: E402
from glm_train.infer.loading import load_trained  # noqa: E402
from glm_train.infer.quant import quantize_model, weight_bytes_report  # noqa: E402

TARGETS = {"int8_ppl_rel": 0.005, "int4_ppl_rel": 0.03, "bytes_ratio_int8": 0.51, "bytes_ratio_int4": 0.27}
LANGS = ("en", "zh")


DECODE_PROMPT = "And God said unto Moses,"


@torch.no_grad()
def score(model: torch.nn.Module, vs: ValidationSet, batch: int, device: str) -> tuple[float, int]:
    """(summed CE over the scored Part-B tokens, their count)."""
    total, count = 0.0, 0
    for i in range(0, len(vs), batch):
        b = collate(vs.samples[i:i + batch])
        logits = model(b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                       prefix_lengths=b["prefix_lengths"].to(device)).float()
        ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].to(device).flatten(), reduction="none")
        mask = b["loss_mask"].to(device).flatten().float()
        total += float((ce * mask).sum(dtype=torch.float64))
        count += int(mask.sum())
    return total, count


def logged_val_loss(path: Path) -> dict[str, float]:
    """The run's last logged validation losses, if ``path`` is a run dir with metrics.jsonl."""
    f = path / "metrics.jsonl"
    if not f.is_file():
        return {}
    last: dict[str, float] = {}
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("val_loss_") for k in rec):
            last = {k: v for k, v in rec.items() if k.startswith("val_loss_")}
    return last


def run(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = Path(args.checkpoint)
    model, tok, run_cfg = load_trained(ckpt)
    model = model.to(args.device)
    two_d = PositionEncoding(model.cfg.position_encoding) == PositionEncoding.rope_2d
    ids = SpecialIds(mask=tok.mask_id, gmask=tok.gmask_id, sop=tok.sop_id, eop=tok.eop_id, pad=tok.pad_id,
                     eod=tok.eod_id)
    ratio = run_cfg.eval.gmask_ratio if run_cfg is not None else 0.5
    max_samples = args.max_samples or (run_cfg.eval.max_samples if run_cfg is not None else 256)
    sets = {}
    for lang in LANGS:
        ds = IndexedDataset(Path(args.data_dir) / f"{lang}_val")
        check_fingerprint(ds, tok)
        sets[lang] = ValidationSet(ds, ids, model.cfg.seq_length, ratio, max_samples, two_d)

    variants: list[tuple[str, int | None, int | None]] = [("float", None, None), ("int8", 8, None), ("int4", 4, None)]
    variants += [(f"int4_g{g}", 4, g) for g in args.group_sizes]
    out: dict[str, Any] = {"checkpoint": str(ckpt), "device": args.device, "seq_length": model.cfg.seq_length,
                           "gmask_ratio": ratio}
    for lang in LANGS:
        out[f"samples_{lang}"] = len(sets[lang])
    from glm_train.infer.generate import benchmark_decode

    for name, bits, gs in variants:
        m = model if bits is None else quantize_model(copy.deepcopy(model), bits, gs)
        if name in ("float", "int8", "int4") and args.decode_tokens > 0:
            # Decoding speed, with and without the KV cache, side by side for each precision.
            for cache in (True, False):
                rates = [benchmark_decode(m, tok, DECODE_PROMPT, args.decode_tokens, use_cache=cache)
                         for _ in range(args.decode_repeats)]
                out[f"decode_tok_s_{name}_{'cache' if cache else 'nocache'}"] = max(rates)
        t0 = time.perf_counter()
        for lang in LANGS:
            total, count = score(m, sets[lang], args.batch, args.device)
            out[f"tokens_{lang}"] = count
            out[f"loss_{lang}_{name}"] = total / count
            out[f"ppl_{lang}_{name}"] = math.exp(total / count)
        out[f"score_s_{name}"] = round(time.perf_counter() - t0, 2)
        rep = weight_bytes_report(m)
        out[f"linear_bytes_{name}"] = rep["linear_bytes"]
        out[f"bytes_ratio_{name}"] = rep["linear_ratio_vs_bf16"]
        if name == "float":
            out["linear_bf16_bytes"] = rep["linear_bf16_bytes"]
        del m
    for name, _, _ in variants[1:]:
        for lang in LANGS:
            out[f"{name}_ppl_rel_{lang}"] = out[f"ppl_{lang}_{name}"] / out[f"ppl_{lang}_float"] - 1.0
    for q in ("int8", "int4"):
        lim = TARGETS[f"{q}_ppl_rel"]
        out[f"{q}_ppl_target_met"] = all(out[f"{q}_ppl_rel_{lang}"] <= lim for lang in LANGS)
        out[f"{q}_bytes_target_met"] = out[f"bytes_ratio_{q}"] <= TARGETS[f"bytes_ratio_{q}"]
    logged = logged_val_loss(ckpt)
    for lang in LANGS:
        if f"val_loss_{lang}" in logged:
            out[f"logged_val_loss_{lang}"] = logged[f"val_loss_{lang}"]
    return out


def table(r: dict[str, Any], names: list[str]) -> str:
    rows = [f"{'variant':<10} {'ppl en':>9} {'rel en':>8} {'ppl zh':>9} {'rel zh':>8} {'linear bytes':>13} "
            f"{'vs BF16':>8}"]
    for n in names:
        rel = [r.get(f"{n}_ppl_rel_{lang}") for lang in LANGS]
        rel_s = [f"{x * 100:+7.2f}%" if x is not None else f"{'-':>8}" for x in rel]
        rows.append(f"{n:<10} {r[f'ppl_en_{n}']:9.3f} {rel_s[0]} {r[f'ppl_zh_{n}']:9.3f} {rel_s[1]} "
                    f"{r[f'linear_bytes_{n}']:13d} {r[f'bytes_ratio_{n}']:8.4f}")
    rows.append(f"(BF16 linear-layer bytes: {r['linear_bf16_bytes']}; scored tokens en {r['tokens_en']}, "
                f"zh {r['tokens_zh']}; {r['samples_en']}/{r['samples_zh']} windows)")
    for q in ("int8", "int4"):
        rows.append(f"target {q}: ppl within {TARGETS[f'{q}_ppl_rel'] * 100:.1f}% -> "
                    f"{'met' if r[f'{q}_ppl_target_met'] else 'NOT met'}; bytes <= "
                    f"{TARGETS[f'bytes_ratio_{q}']}x BF16 -> {'met' if r[f'{q}_bytes_target_met'] else 'NOT met'}")
    if "decode_tok_s_float_cache" in r:
        rows.append(f"decoding tokens/s (greedy, batch 1, best of repeats): {'':<4}{'cache':>8}{'no cache':>10}")
        for n in ("float", "int8", "int4"):
            rows.append(f"  {n:<8}{r[f'decode_tok_s_{n}_cache']:>44.1f}{r[f'decode_tok_s_{n}_nocache']:>10.1f}")
    if "logged_val_loss_en" in r:
        rows.append("float loss vs the run's last logged validation loss: "
                    + ", ".join(f"{lang} {r[f'loss_{lang}_float']:.4f} / {r[f'logged_val_loss_{lang}']:.4f}"
                                for lang in LANGS if f"logged_val_loss_{lang}" in r))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="run dir, checkpoint folder or export (default: runs/demo if it has a checkpoint)")
    p.add_argument("--data-dir", default=str(REPO / "data" / "demo"), help="folder with en_val / zh_val")
    p.add_argument("--max-samples", type=int, default=None,
                   help="validation windows per language (default: the run's eval.max_samples, else 256)")
    p.add_argument("--group-sizes", type=int, nargs="*", default=[32],
                   help="extra INT4 variants with group-wise scales (extension beyond GLM-130B)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens per decoding-speed run (0: skip)")
    p.add_argument("--decode-repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.checkpoint is None:
        demo = REPO / "runs" / "demo"
        if not (demo / "checkpoints" / "latest").is_file():
            print(f"{demo} has no checkpoint and this benchmark trains nothing: run `make demo` first or pass "
                  "--checkpoint PATH", file=sys.stderr)
            return 2
        args.checkpoint = str(demo)
    torch.set_grad_enabled(False)
    r = run(args)
    names = ["float", "int8", "int4"] + [f"int4_g{g}" for g in args.group_sizes]
    print(table(r, names))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
