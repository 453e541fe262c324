"""Zero-shot evaluation of a GLM the GLM way: log-probabilities of a continuation given a context.

A request (context, continuation) becomes one sequence::

    Part A: context tokens + [gMASK] (or [MASK])     bidirectional
    Part B: <sop> + continuation[:-1]                 causal, sees all of Part A

and the continuation's tokens are the targets of Part B (``<sop>`` predicts the first one). No
``<eop>`` is scored: a continuation is a piece of text, not a finished span. Positions follow the
training samples (data/blank_infilling.py): with [gMASK] (1D) they simply continue through Part B;
with [MASK] every Part-B token takes the position of the [MASK]; 2D positions give Part B
(position of the mask token, 1-based index within the span). A context that does not fit is cut
from the left (its newest tokens are kept); a continuation longer than ``seq_length - 1`` tokens is
an error. Log-probabilities are the log-softmax over the model's whole (padded) vocabulary, as in
the training loss. Requests are batched (sorted by length, padded at the end, which no earlier
position sees), so results do not depend on the batch size beyond float rounding.

On top of :class:`GLMScorer`:

* :func:`perplexity`: every token of every document scored exactly once by rolling windows
  (:func:`rolling_windows`, the GLM-130B language-modelling scheme); perplexity
  ``exp(nats / tokens)``, bits per byte ``nats / (ln 2 * UTF-8 bytes)``.
* :func:`lambada_accuracy`: last-word prediction, [gMASK] context, the target in Part B; a hit when
  greedy decoding yields exactly the target's tokens.
* :func:`choice_accuracy`: multiple choice, context + [MASK], each choice in Part B in its own
  sequence (so choices never see each other), the summed log-probability picks the answer.

docs/evaluation.md describes the task formats and the exact definitions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from glm_train.data.tokenizer import GLMTokenizer

__all__ = [
    "GLMScorer",
    "TokenScore",
    "choice_accuracy",
    "lambada_accuracy",
    "lm_metrics",
    "load_jsonl",
    "load_texts",
    "perplexity",
    "rolling_windows",
    "split_pair",
]


@dataclass
class TokenScore:
    """Score of one request's continuation."""

    logprob: float
    """Summed log-probability (nats) of the continuation's tokens."""
    is_greedy: bool
    """Every continuation token is the arg-max at its position (what greedy decoding produces)."""
    n_tokens: int
    """Number of continuation tokens scored."""
    token_logprobs: list[float] | None = None
    """Per-token log-probabilities (only when asked for)."""


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context to the front of the continuation (as lm-eval does),
    so ``"... said unto "`` + ``"Moses"`` is tokenized like ``"... said unto"`` + ``" Moses"``."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def _device_of(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class GLMScorer:
    """Batched log-probabilities of continuations under the GLM blank-infilling layout."""

    def __init__(self, model: torch.nn.Module, tok: GLMTokenizer, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.seq_length = int(model.cfg.seq_length)
        self.two_d = bool(getattr(model, "two_d", False))
        self.device = _device_of(model)

    # ------------------------------------------------------------------ one sequence

    def build(self, context: Sequence[int], continuation: Sequence[int], mask: str = "gmask"
              ) -> tuple[list[int], list[int] | list[list[int]], int]:
        """(input ids, position ids, Part-A length) of one request; see the module docstring."""
        n = len(continuation)
        s = self.seq_length
        if n > s - 1:
            raise ValueError(f"continuation of {n} tokens does not fit a sequence of {s} "
                             f"(at most {s - 1}: [gMASK] and <sop> take one place each, the last token is not fed)")
        if mask not in ("gmask", "mask"):
            raise ValueError(f"mask must be 'gmask' or 'mask', got {mask!r}")
        keep = s - 1 - n  # context tokens that fit beside the mask token and Part B
        ctx = list(context)[len(context) - keep:] if keep > 0 else []
        mask_id = self.tok.gmask_id if mask == "gmask" else self.tok.mask_id
        part_a = ctx + [mask_id]
        p = len(part_a)
        ids = part_a + [self.tok.sop_id] + list(continuation[:-1])
        if self.two_d:
            pos = [list(range(p)) + [p - 1] * n, [0] * p + list(range(1, n + 1))]
            return ids, pos, p
        if mask == "gmask":
            return ids, list(range(len(ids))), p
        return ids, list(range(p)) + [p - 1] * n, p

    # ------------------------------------------------------------------ batches

    @torch.no_grad()
    def score_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], mask: str = "gmask",
                     per_token: bool = False) -> list[TokenScore]:
        """Score token-level requests (context ids, continuation ids); results in request order."""
        out: list[TokenScore | None] = [None] * len(requests)
        built = []
        for i, (ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                out[i] = TokenScore(0.0, True, 0, [] if per_token else None)
                continue
            ids, pos, p = self.build(ctx, cont, mask)
            built.append((i, ids, pos, p, list(cont)))
        built.sort(key=lambda b: -len(b[1]))  # similar lengths together, longest first
        for start in range(0, len(built), self.batch_size):
            chunk = built[start:start + self.batch_size]
            for (i, *_), score in zip(chunk, self._forward(chunk, per_token)):
                out[i] = score
        return out  # type: ignore[return-value]

    def _forward(self, chunk: list[tuple[int, list[int], Any, int, list[int]]], per_token: bool
                 ) -> list[TokenScore]:
        width = max(len(ids) for _, ids, _, _, _ in chunk)
        pad = self.tok.pad_id
        input_ids, positions, prefix = [], [], []
        for _, ids, pos, p, _ in chunk:
            extra = width - len(ids)
            input_ids.append(ids + [pad] * extra)
            # Padding repeats the last position (RoPE stays in range); nothing real attends to it.
            if self.two_d:
                positions.append([pos[0] + [pos[0][-1]] * extra, pos[1] + [0] * extra])
            else:
                positions.append(pos + [pos[-1]] * extra)
            prefix.append(p)
        dev = self.device
        logits = self.model(torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev),
                            torch.tensor(prefix, device=dev))
        scores = []
        for row, (_, _, _, p, cont) in enumerate(chunk):
            n = len(cont)
            lp = F.log_softmax(logits[row, p:p + n].float(), dim=-1)
            target = torch.tensor(cont, device=lp.device)
            tok_lp = lp.gather(1, target[:, None])[:, 0]
            greedy = bool((lp.argmax(dim=-1) == target).all())
            scores.append(TokenScore(float(tok_lp.double().sum()), greedy, n,
                                     tok_lp.tolist() if per_token else None))
        return scores

    # ------------------------------------------------------------------ text

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), each encoded on its own after :func:`split_pair`."""
        context, continuation = split_pair(context, continuation)
        return self.tok.encode(context) if context else [], self.tok.encode(continuation)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]], mask: str = "gmask") -> list[TokenScore]:
        """Score text requests (context, continuation)."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in pairs], mask)

    def rolling_token_scores(self, docs: Sequence[Sequence[int]], stride: int | None = None
                             ) -> list[float]:
        """Summed log-probability of every token of each document (rolling windows)."""
        stride = default_stride(self.seq_length) if stride is None else stride
        reqs, owner = [], []
        for d, toks in enumerate(docs):
            toks = list(toks)
            for c0, a, b in rolling_windows(len(toks), self.seq_length, stride):
                reqs.append((toks[c0:a], toks[a:b]))
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, s in zip(owner, self.score_tokens(reqs, "gmask")):
            totals[d] += s.logprob
        return totals

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[float]:
        """Summed log-probability (nats) of each whole text."""
        return self.rolling_token_scores([self.tok.encode(t) for t in texts], stride)


# ---------------------------------------------------------------------- language modelling


def default_stride(seq_length: int) -> int:
    """Tokens scored per window after the first: seq_length / 8 (GLM-130B: 256 of 2048)."""
    return max(1, seq_length // 8)


def rolling_windows(n_tokens: int, seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(context_start, start, end)`` that score tokens ``[start, end)`` exactly once.

    The first window scores tokens ``[0, seq_length - 1)`` with an empty context (Part A is the
    [gMASK] alone). Each later window scores the next ``stride`` tokens (the last one fewer) with
    the preceding ``seq_length - 1 - (end - start)`` tokens (as many as exist) as bidirectional
    context, so every sequence is at most ``seq_length`` long. This is GLM-130B's language-modelling
    evaluation, except that its first window spends one token as context instead of scoring it.
    """
    if not 1 <= stride <= seq_length - 1:
        raise ValueError(f"stride must be in [1, {seq_length - 1}], got {stride}")
    if n_tokens <= 0:
        return []
    first = min(n_tokens, seq_length - 1)
    out = [(0, 0, first)]
    pos = first
    while pos < n_tokens:
        end = min(n_tokens, pos + stride)
        ctx = min(pos, seq_length - 1 - (end - pos))
        out.append((pos - ctx, pos, end))
        pos = end
    return out


def lm_metrics(nats: float, tokens: int, n_bytes: int) -> dict[str, float]:
    """Perplexity per token ``exp(nats / tokens)`` and bits per UTF-8 byte ``nats / (ln 2 * bytes)``.

    ``nats`` is the total negative log-likelihood of the scored text.
    """
    if tokens <= 0 or n_bytes <= 0:
        raise ValueError("no text scored")
    return {"ppl": math.exp(nats / tokens), "bpb": nats / (math.log(2) * n_bytes),
            "nats_per_token": nats / tokens}


def perplexity(scorer: GLMScorer, docs: Sequence[str], stride: int | None = None) -> dict[str, Any]:
    """Perplexity and bits per byte of ``docs``, each document scored on its own (no <eod>)."""
    docs = [d for d in docs if d]
    toks = scorer.tok.encode_batch(docs)
    stride = default_stride(scorer.seq_length) if stride is None else stride
    logprobs = scorer.rolling_token_scores(toks, stride)
    nats = -sum(logprobs)
    tokens = sum(len(t) for t in toks)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return {**lm_metrics(nats, tokens, n_bytes), "nats": nats, "tokens": tokens, "bytes": n_bytes,
            "docs": len(docs), "stride": stride, "seq_length": scorer.seq_length}


# ---------------------------------------------------------------------- tasks


def lambada_accuracy(scorer: GLMScorer, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items ``{"context", "target"}``: [gMASK] context, the target in Part B; a hit when greedy
    decoding gives exactly the target's tokens (every target token is the arg-max)."""
    scores = scorer.loglikelihood([(it["context"], it["target"]) for it in items], "gmask")
    hits = sum(s.is_greedy for s in scores)
    n_tok = sum(s.n_tokens for s in scores)
    return {"acc": hits / len(items) if items else float("nan"), "n": len(items), "hits": hits,
            "target_nats_per_token": -sum(s.logprob for s in scores) / max(1, n_tok)}


def choice_scores(scorer: GLMScorer, items: Sequence[dict[str, Any]], mask: str = "mask") -> list[list[float]]:
    """Summed log-probability of each choice of each item ``{"context", "choices", "label"}``.

    Each choice is its own sequence: context + [MASK] in Part A, <sop> + choice in Part B. Choices
    share nothing but the context, so one choice's text cannot change another's score.
    """
    pairs, owner = [], []
    for k, it in enumerate(items):
        for ch in it["choices"]:
            pairs.append((it["context"], ch))
            owner.append(k)
    scores = scorer.loglikelihood(pairs, mask)
    out: list[list[float]] = [[] for _ in items]
    for k, s in zip(owner, scores):
        out[k].append(s.logprob)
    return out


def choice_accuracy(scorer: GLMScorer, items: Sequence[dict[str, Any]], mask: str = "mask") -> dict[str, Any]:
    """Accuracy of the arg-max summed log-probability choice (first one on ties)."""
    per = choice_scores(scorer, items, mask)
    hits = 0
    for it, sc in zip(items, per):
        best = max(range(len(sc)), key=lambda j: sc[j])
        hits += int(best == int(it["label"]))
    chance = sum(1.0 / len(it["choices"]) for it in items) / len(items) if items else float("nan")
    return {"acc": hits / len(items) if items else float("nan"), "n": len(items), "hits": hits,
            "chance": chance}


# ---------------------------------------------------------------------- inputs


def load_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """JSON objects, one per non-empty line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{ln}: not JSON ({e})") from None
            if limit is not None and len(out) >= limit:
                break
    return out


def _indexed_prefix(path: Path) -> Path | None:
    """The indexed dataset a path names (``prefix`` or ``prefix.idx``/``.bin``), if there is one."""
    base = path.with_suffix("") if path.suffix in (".idx", ".bin") else path
    return base if base.with_suffix(".idx").is_file() and base.with_suffix(".bin").is_file() else None


def demo_fallback(path: Path) -> Path | None:
    """``<dir>/jsonl/<name>.jsonl`` missing (data prepared by an older glm-prepare-demo): the
    indexed dataset ``<dir>/<name>`` made from it, whose tokens decode to the same text."""
    if path.suffix == ".jsonl" and path.parent.name == "jsonl":
        return _indexed_prefix(path.parent.parent / path.stem)
    return None


def text_source(path: str | Path) -> Path:
    """The file or indexed dataset that :func:`load_texts` reads for ``path``."""
    p = Path(path)
    fallback = demo_fallback(p) if not p.exists() else None
    return fallback if fallback is not None else p


def load_texts(path: str | Path, tok: GLMTokenizer | None = None, limit: int | None = None) -> list[str]:
    """Documents from a ``.jsonl`` (field ``text``), a ``.json`` list of strings, an indexed dataset
    prefix (decoded with ``tok``) or any other text file (one document)."""
    p = text_source(path)
    prefix = _indexed_prefix(p)
    if prefix is not None:
        if tok is None:
            raise ValueError(f"{path}: an indexed dataset needs the tokenizer to decode it")
        from glm_train.data.indexed import IndexedDataset

        ds = IndexedDataset(prefix)
        n = len(ds) if limit is None else min(limit, len(ds))
        return [tok.decode(ds[i].tolist()) for i in range(n)]
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such text file (jsonl with 'text', .json, .txt or an indexed dataset)")
    if p.suffix == ".jsonl":
        docs = []
        for k, obj in enumerate(load_jsonl(p, limit)):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{p}: line {k + 1} has no string field 'text'")
            docs.append(obj["text"])
        return docs
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
            raise ValueError(f"{p}: expected a JSON list of strings")
        return data[:limit] if limit is not None else data
    return [p.read_text(encoding="utf-8")]


def check_items(items: Iterable[dict[str, Any]], kind: str, where: str) -> None:
    """Validate task items: lambada ``{"context", "target"}``, choice ``{"context", "choices", "label"}``."""
    for k, it in enumerate(items):
        if not isinstance(it.get("context"), str):
            raise ValueError(f"{where}: item {k} lacks a string 'context'")
        if kind == "lambada":
            if not isinstance(it.get("target"), str) or not it["target"].strip():
                raise ValueError(f"{where}: item {k} lacks a non-empty string 'target'")
        else:
            ch = it.get("choices")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise ValueError(f"{where}: item {k} needs 'choices', a list of >= 2 non-empty strings")
            if not isinstance(it.get("label"), int) or not 0 <= it["label"] < len(ch):
                raise ValueError(f"{where}: item {k} needs an integer 'label' in [0, {len(ch)})")
