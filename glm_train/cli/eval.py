"""glm-eval: perplexity / bits per byte, last-word accuracy and multiple choice of a checkpoint."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("ppl", "lambada", "choice")
DEMO_EVAL = "data/demo/eval"


@dataclass
class EvalConfig:
    """Arguments of glm-eval (KEY=VALUE)."""

    checkpoint: str = "runs/demo"
    """A run dir (its latest checkpoint), a checkpoint folder or an export."""
    quant: str = "none"
    """Weight-only quantization before evaluating: none, int8 or int4."""
    group_size: int | None = None
    """Columns per quantization scale (None: one scale per output row, as GLM-130B)."""
    out: str | None = None
    """JSON file to write (None: print the table only)."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Which evaluations: ppl (keys ppl_<name>, bpb_<name>), lambada (lambada_<name>), choice (mc_<name>)."""
    text: dict[str, str] = field(default_factory=lambda: {"en": "data/demo/jsonl/en_val.jsonl",
                                                          "zh": "data/demo/jsonl/zh_val.jsonl"})
    """Held-out text per name: jsonl with 'text', .json list, .txt (one document) or an indexed dataset."""
    lambada: dict[str, str] = field(default_factory=lambda: {"en": f"{DEMO_EVAL}/lambada_en.jsonl",
                                                             "zh": f"{DEMO_EVAL}/lambada_zh.jsonl"})
    """Last-word task files per name (jsonl {"context", "target"})."""
    choice: dict[str, str] = field(default_factory=lambda: {"en": f"{DEMO_EVAL}/choice_en.jsonl",
                                                            "zh": f"{DEMO_EVAL}/choice_zh.jsonl"})
    """Multiple-choice task files per name (jsonl {"context", "choices", "label"})."""
    choice_mask: str = "mask"
    """Mask token before the choices: mask ([MASK], SPEC) or gmask."""
    stride: int | None = None
    """Tokens scored per rolling window after the first (None: seq_length // 8)."""
    limit: int | None = None
    """At most this many documents / items per file (quick runs)."""
    batch_size: int = 16
    """Sequences per forward pass."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda[:i]."""
    dtype: str = "fp32"
    """Float weights: fp32, bf16 or fp16."""


def _parse(overrides: list[str]) -> EvalConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from glm_train.config import ConfigError

    fixed = []
    for o in overrides:  # tasks=ppl,lambada is accepted as well as tasks=[ppl,lambada]
        if o.startswith("tasks=") and not o[len("tasks="):].startswith("["):
            o = f"tasks=[{o[len('tasks='):]}]"
        fixed.append(o)
    try:
        base = OmegaConf.structured(EvalConfig)
        for o in fixed:  # text={mine:f.jsonl} replaces the default files instead of adding to them
            key = o.split("=", 1)[0]
            if key in ("text", "lambada", "choice"):
                base[key] = {}
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(fixed))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key: {getattr(e, 'full_key', '?')})") from None
    assert isinstance(cfg, EvalConfig)
    bad = [t for t in cfg.tasks if t not in TASKS]
    if bad or not cfg.tasks:
        raise ConfigError(f"tasks: unknown {bad} (choose from {list(TASKS)})")
    if cfg.quant not in ("none", "int8", "int4"):
        raise ConfigError(f"quant: {cfg.quant!r} is not none, int8 or int4")
    if cfg.dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"dtype: {cfg.dtype!r} is not fp32, bf16 or fp16")
    if cfg.choice_mask not in ("mask", "gmask"):
        raise ConfigError(f"choice_mask: {cfg.choice_mask!r} is not mask or gmask")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size must be >= 1")
    return cfg


def _ensure_demo_tasks(cfg: EvalConfig) -> None:
    """Build the demo task files when a default path is asked for and missing (from cached sources)."""
    wanted = []
    if "lambada" in cfg.tasks:
        wanted += list(cfg.lambada.values())
    if "choice" in cfg.tasks:
        wanted += list(cfg.choice.values())
    missing = [p for p in wanted if not Path(p).is_file() and Path(p).parent == Path(DEMO_EVAL)]
    if missing:
        from data_tools.demo_lambada import build_demo_lambada

        print(f"[glm-eval] building the demo tasks in {DEMO_EVAL}", file=sys.stderr)
        build_demo_lambada(Path(DEMO_EVAL).parent, fetch=False)


def load_for_eval(checkpoint: str, quant: str = "none", group_size: int | None = None, device: str = "auto",
                  dtype: str = "fp32") -> tuple[Any, Any]:
    """(model, tokenizer) ready to score: float model, optionally quantized (glm_train.infer.quant)."""
    import torch

    from glm_train.infer.loading import load_trained

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, _ = load_trained(checkpoint, device=device)
    model = model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    if quant != "none":
        from glm_train.infer.quant import quantize_model

        bits = {"int8": 8, "int4": 4}[quant]
        model = quantize_model(model, bits, group_size=group_size)
    return model.eval(), tok


def run_eval(cfg: EvalConfig, model: Any = None, tok: Any = None) -> dict[str, Any]:
    """All requested evaluations; the result dict that glm-eval writes."""
    from glm_train.infer.evaluate import (
        GLMScorer,
        check_items,
        choice_accuracy,
        lambada_accuracy,
        load_jsonl,
        load_texts,
        perplexity,
        text_source,
    )

    t0 = time.perf_counter()
    if model is None:
        model, tok = load_for_eval(cfg.checkpoint, cfg.quant, cfg.group_size, cfg.device, cfg.dtype)
    _ensure_demo_tasks(cfg)
    scorer = GLMScorer(model, tok, cfg.batch_size)
    res: dict[str, Any] = {"checkpoint": cfg.checkpoint, "quant": cfg.quant, "group_size": cfg.group_size,
                           "dtype": cfg.dtype, "seq_length": scorer.seq_length}
    details: dict[str, Any] = {}
    if "ppl" in cfg.tasks:
        for name, path in cfg.text.items():
            r = perplexity(scorer, load_texts(path, tok, cfg.limit), cfg.stride)
            res[f"ppl_{name}"], res[f"bpb_{name}"] = r["ppl"], r["bpb"]
            details[f"ppl_{name}"] = {**r, "source": str(text_source(path))}
    if "lambada" in cfg.tasks:
        for name, path in cfg.lambada.items():
            items = load_jsonl(path, cfg.limit)
            check_items(items, "lambada", str(path))
            r = lambada_accuracy(scorer, items)
            res[f"lambada_{name}"] = r["acc"]
            details[f"lambada_{name}"] = {**r, "source": str(path)}
    if "choice" in cfg.tasks:
        for name, path in cfg.choice.items():
            items = load_jsonl(path, cfg.limit)
            check_items(items, "choice", str(path))
            r = choice_accuracy(scorer, items, cfg.choice_mask)
            res[f"mc_{name}"] = r["acc"]
            details[f"mc_{name}"] = {**r, "source": str(path), "mask": cfg.choice_mask}
    res["details"] = details
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def format_table(res: dict[str, Any]) -> str:
    """One line per headline figure."""
    rows = [("metric", "value", "on")]
    for key, d in res["details"].items():
        if key.startswith("ppl_"):
            name = key[4:]
            on = f"{d['docs']} docs, {d['tokens']} tokens, {d['bytes']} bytes"
            rows.append((f"ppl_{name}", f"{res[f'ppl_{name}']:.3f}", on))
            rows.append((f"bpb_{name}", f"{res[f'bpb_{name}']:.4f}", f"stride {d['stride']}"))
        else:
            extra = f", chance {d['chance']:.2f}" if "chance" in d else ""
            rows.append((key, f"{res[key]:.4f}", f"{d['hits']}/{d['n']} items{extra}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def _finite(x: Any) -> Any:
    """Strict JSON: non-finite floats as the strings "inf"/"nan" (as metrics.jsonl does)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def eval_cli(overrides: list[str]) -> int:
    """Usage: glm-eval checkpoint=RUN_DIR|CHECKPOINT|EXPORT [quant=none|int8|int4] [out=FILE.json]
    [tasks=ppl,lambada,choice] [text.en=FILE] [lambada.en=FILE] [choice.en=FILE] [stride=N] [limit=N]
    [batch_size=16] [device=auto|cpu|cuda] [dtype=fp32|bf16|fp16] [group_size=N] [choice_mask=mask|gmask]

    JSON keys: ppl_<name>, bpb_<name> (text.<name>), lambada_<name>, mc_<name>, details. See docs/evaluation.md.
    """
    cfg = _parse(overrides)
    res = run_eval(cfg)
    print(f"glm-eval {cfg.checkpoint} quant={cfg.quant} ({res['elapsed_s']:.1f}s)")
    print(format_table(res))
    if cfg.out:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(_finite(res), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out)
        print(f"wrote {out}")
    return 0


def main() -> None:
    from glm_train.cli.common import run_cli

    sys.exit(run_cli(eval_cli))


if __name__ == "__main__":
    main()
