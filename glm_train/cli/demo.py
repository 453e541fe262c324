"""glm-demo: prepare the demo corpus, train the toy model, and show what it learned.

Prints per language the unigram entropy of the validation text under our tokenizer (nats/token),
the validation loss before and after training (same unit, [gMASK] samples of held-out documents,
see glm_train/data/dataset.py:ValidationSet), and sampled English and Chinese continuations.
Then quantizes the model to INT8 and INT4 (weight-only, glm_train/infer/quant.py), prints float/INT8/INT4
validation perplexities and an INT4 sample. Writes the figures to <run.dir>/demo_summary.json.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

PROMPTS = {"en": "And God said unto Moses,", "zh": "却说曹操引兵"}


def demo(overrides: list[str]) -> int:
    """Usage: glm-demo [KEY=VALUE ...]  (defaults: configs/demo.yaml; add fresh=true to start over)"""
    fresh = "fresh=true" in overrides
    overrides = [o for o in overrides if not o.startswith("fresh=")]
    from data_tools.demo_corpus import prepare_demo

    stats = prepare_demo("data/demo")
    from glm_train.config import load_config

    cfg = load_config(overrides, config_name="demo")
    run_dir = Path(cfg.run.dir)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    from glm_train.env import setup_environment

    backend = setup_environment()
    from glm_train.train.trainer import Trainer, shutdown

    print(f"training {cfg.model.name} ({cfg.model.layers} layers, d={cfg.model.hidden}) for at most "
          f"{cfg.train.iters} steps / {cfg.train.max_seconds} s; run dir {run_dir}", flush=True)
    t0 = time.perf_counter()
    try:
        state = Trainer(cfg, backend).fit()
    finally:
        shutdown()
    wall = time.perf_counter() - t0

    from glm_train.infer.generate import SamplingConfig, generate
    from glm_train.infer.loading import load_trained
    from glm_train.train.metrics import read_metrics

    recs = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in recs if any(k.startswith("val_loss_") for k in r)]
    before, after = evals[0], evals[-1]
    model, tok, _ = load_trained(run_dir)
    summary: dict[str, object] = {"train_seconds": round(state.elapsed_s, 1), "train_wall_seconds": round(wall, 1),
                                  "steps": state.step, "tokens_seen": state.consumed_samples * cfg.model.seq_length}
    print("\n" + "=" * 72)
    print(f"trained {state.step} steps in {state.elapsed_s:.0f} s ({wall:.0f} s wall with evaluation)")
    print(f"{'lang':<5}{'unigram':>10}{'val before':>12}{'val after':>11}{'after/unigram':>15}")
    for lang in ("en", "zh"):
        uni = float(stats[f"unigram_{lang}"])
        b, a = before[f"val_loss_{lang}"], after[f"val_loss_{lang}"]
        summary.update({f"unigram_{lang}": round(uni, 4), f"val_loss_{lang}": round(a, 4),
                        f"val_loss_before_{lang}": round(b, 4), f"ratio_{lang}": round(a / uni, 4)})
        print(f"{lang:<5}{uni:>10.3f}{b:>12.3f}{a:>11.3f}{a / uni:>15.3f}")
    print("(nats per token; validation = Part-B tokens of [gMASK] samples of held-out documents)")
    for lang, prompt in PROMPTS.items():
        text = generate(model, tok, prompt, SamplingConfig(max_new_tokens=60, min_new_tokens=40, seed=1))
        summary[f"sample_{lang}"] = prompt + text
        print(f"\n[{lang}] {prompt}{text}")
    _quantized(model, tok, cfg, summary)
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    print(f"\nwrote {run_dir / 'demo_summary.json'}, {run_dir / 'loss.png'}, {run_dir / 'metrics.jsonl'}")
    return 0


def validation_ppl(model, tok, cfg) -> dict[str, float]:  # noqa: ANN001
    """exp(validation loss) per language, the trainer's measure (Part-B tokens of [gMASK] windows)."""
    import math

    import torch

    from glm_train.data.dataset import ValidationSet, collate
    from glm_train.data.indexed import IndexedDataset
    from glm_train.train.loss import masked_token_losses
    from glm_train.train.trainer import special_ids

    out = {}
    for lang, prefix in cfg.data.valid.items():
        vs = ValidationSet(IndexedDataset(prefix), special_ids(tok), cfg.model.seq_length, cfg.eval.gmask_ratio,
                           cfg.eval.max_samples)
        nats = count = 0.0
        for i in range(0, len(vs.samples), 32):
            b = collate(vs.samples[i:i + 32])
            with torch.no_grad():
                logits = model(b["input_ids"], position_ids=b["position_ids"], prefix_lengths=b["prefix_lengths"])
            nats += float((masked_token_losses(logits, b["targets"]) * b["loss_mask"]).sum())
            count += float(b["loss_mask"].sum())
        out[lang] = math.exp(nats / count)
    return out


def _quantized(model, tok, cfg, summary: dict[str, object]) -> None:  # noqa: ANN001
    """Float vs INT8 vs INT4 (weight-only, per-row absmax) perplexity, and an INT4 sample."""
    import copy

    from glm_train.infer.generate import SamplingConfig, generate
    from glm_train.infer.quant import quantize_model, weight_bytes_report

    rows = {"float": (validation_ppl(model, tok, cfg), None)}
    int4 = None
    for bits in (8, 4):
        q = quantize_model(copy.deepcopy(model), bits)
        rows[f"int{bits}"] = (validation_ppl(q, tok, cfg), weight_bytes_report(q))
        int4 = q
    print(f"\n{'weights':<8}{'ppl en':>10}{'ppl zh':>10}{'vs float':>18}")
    base = rows["float"][0]
    for name, (ppl, _) in rows.items():
        rel = "" if name == "float" else f"{ppl['en'] / base['en'] - 1:+.2%} / {ppl['zh'] / base['zh'] - 1:+.2%}"
        print(f"{name:<8}{ppl['en']:>10.2f}{ppl['zh']:>10.2f}{rel:>18}")
        for lang in ("en", "zh"):
            summary[f"ppl_{lang}_{name}"] = round(ppl[lang], 3)
    assert int4 is not None
    for lang, prompt in PROMPTS.items():
        text = generate(int4, tok, prompt, SamplingConfig(max_new_tokens=60, min_new_tokens=40, seed=1))
        summary[f"sample_int4_{lang}"] = prompt + text
        print(f"\n[{lang}, INT4] {prompt}{text}")


def main() -> None:
    from glm_train.cli.common import run_cli

    sys.exit(run_cli(demo))


if __name__ == "__main__":
    main()
