"""EleutherAI lm-evaluation-harness (``lm-eval``) adapter: evaluate a glm_train checkpoint.

Importing this module registers the model class under the names ``glm_train`` and ``glm-train``
in lm-eval's model registry. lm-eval itself never imports glm_train (it has no plugin entry
points, and ``--include_path`` only adds task YAMLs), so use one of::

    # lm-eval's own command line, with the model registered first (same arguments as lm_eval):
    python -m glm_train.infer.lm_eval_adapter --model glm_train \\
        --model_args checkpoint=runs/demo,quant=int4 --tasks lambada_openai --batch_size 16

    # from Python
    import lm_eval, glm_train.infer.lm_eval_adapter  # noqa: F401 (registers "glm_train")
    lm_eval.simple_evaluate(model="glm_train", model_args="checkpoint=runs/demo", tasks=[...])

``--model_args``: ``checkpoint`` (run dir, checkpoint folder or export), ``quant``
(none/int8/int4), ``group_size``, ``device`` (auto/cpu/cuda), ``dtype`` (fp32/bf16/fp16),
``batch_size``, ``stride`` (rolling-window stride, default seq_length // 8), ``max_gen_toks``.

Requests map onto :mod:`glm_train.infer.evaluate` (the same code as glm-eval):

* ``loglikelihood(context, continuation)``: [gMASK] context in Part A, the continuation in Part B;
  returns (summed log-probability, whether every token is the arg-max).
* ``loglikelihood_rolling(text)``: the text's total log-probability by the rolling windows of
  :func:`glm_train.infer.evaluate.rolling_windows` (equal to glm-eval's perplexity total).
* ``generate_until(context, gen_kwargs)``: greedy [gMASK] continuation with
  :func:`glm_train.infer.generate.generate` (stops at <eop>/<eod> or ``max_gen_toks``); the text is
  cut before the first stop string of ``until``. Sampling arguments are ignored (greedy only).
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (registers lm-eval's own models before ours: see get_model)
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry

from glm_train.infer.evaluate import GLMScorer

__all__ = ["GLMTrainLM", "main"]

DEFAULT_BATCH = 16
DEFAULT_MAX_GEN_TOKS = 256


def _int_or_default(v: Any, default: int) -> int:
    if v is None or v == "" or (isinstance(v, str) and v.startswith("auto")):
        return default
    return int(v)


class GLMTrainLM(LM):
    """A glm_train model as an lm-eval ``LM`` (greedy generation; one process)."""

    def __init__(self, checkpoint: str | None = None, quant: str = "none", group_size: int | None = None,
                 device: str | None = None, dtype: str = "fp32", batch_size: int | str | None = None,
                 max_batch_size: int | None = None, stride: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, model: Any = None, tokenizer: Any = None,
                 **unused: Any) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"glm_train: unknown model_args {sorted(unused)} (known: checkpoint, quant, "
                             "group_size, device, dtype, batch_size, max_batch_size, stride, max_gen_toks)")
        if model is None:
            import torch

            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                print(f"[glm_train] device {device} unavailable: using cpu", file=sys.stderr)
                device = "cpu"
            if checkpoint is None:
                raise ValueError("glm_train: give checkpoint=PATH in --model_args")
            from glm_train.cli.eval import load_for_eval

            model, tokenizer = load_for_eval(str(checkpoint), str(quant),
                                             None if group_size is None else int(group_size),
                                             device or "auto", str(dtype))
        elif tokenizer is None:
            raise ValueError("glm_train: a model object needs its tokenizer")
        bs = _int_or_default(batch_size, DEFAULT_BATCH)
        if max_batch_size is not None:
            bs = min(bs, int(max_batch_size))
        self.scorer = GLMScorer(model, tokenizer, bs)
        self.model, self.tok = model, tokenizer
        self.stride = None if stride is None else int(stride)
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.scorer.device

    # lm-eval passes its own batch_size/max_batch_size/device (its CLI: batch 1, device cuda:0) beside
    # --model_args; a key given in --model_args wins instead of clashing.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> GLMTrainLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> GLMTrainLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @property
    def tokenizer_name(self) -> str:
        return f"glm_train:{self.tok.fingerprint()[:16]}"

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        scores = self.scorer.loglikelihood(pairs, "gmask")
        out = []
        for pair, s in zip(pairs, scores):
            res = (s.logprob, s.is_greedy)
            self.cache_hook.add_partial("loglikelihood", pair, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        totals = self.scorer.loglikelihood_rolling(texts, self.stride)
        for t, v in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), v)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from glm_train.infer import generate as gen

        jobs: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            kwargs = dict(r.args[1]) if len(r.args) > 1 and r.args[1] else {}
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            jobs.setdefault((tuple(until), max_new), []).append(i)
        out = [""] * len(requests)
        bs = self.scorer.batch_size
        for (until, max_new), idx in jobs.items():
            cfg = gen.SamplingConfig(max_new_tokens=max_new, temperature=0.0, top_k=0, top_p=1.0,
                                     repetition_penalty=1.0)
            for k in range(0, len(idx), bs):
                chunk = idx[k:k + bs]
                contexts = [requests[i].args[0] for i in chunk]
                if hasattr(gen, "generate_batch"):
                    texts = gen.generate_batch(self.model, self.tok, contexts, cfg)
                else:
                    texts = [gen.generate(self.model, self.tok, c, cfg) for c in contexts]
                for i, text in zip(chunk, texts):
                    out[i] = cut_at_stop(text, list(until))
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]


if "glm_train" not in model_registry:
    model_registry.register("glm_train")(GLMTrainLM)
    model_registry.register("glm-train")(GLMTrainLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the glm_train model registered (same arguments as ``lm_eval``)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
