"""Sampling from a GLM: [gMASK] continuation of a prompt (Part A), generated in Part B.

Full recomputation at each step (no KV cache yet): fine for the demo's short continuations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glm_train.data.tokenizer import GLMTokenizer
from glm_train.model import GLMModel


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 64
    """Tokens to generate at most (stops earlier at <eop>/<eod>)."""
    min_new_tokens: int = 0
    """Do not stop (<eop>/<eod> are not sampled) before this many tokens."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy."""
    top_k: int = 40
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 0.95
    """Keep the smallest set whose probability reaches p (1.0: all)."""
    repetition_penalty: float = 1.3
    """Divide positive logits (multiply negative) of tokens already present by this (1.0: off)."""
    seed: int = 0
    """Sampling seed."""


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        logits = logits.scatter(0, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def generate(model: GLMModel, tok: GLMTokenizer, prompt: str, cfg: SamplingConfig | None = None) -> str:
    """Continue ``prompt``: Part A = prompt + [gMASK], Part B = <sop> + generated tokens."""
    cfg = cfg or SamplingConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    part_a = tok.encode(prompt) + [tok.gmask_id]
    ids = part_a + [tok.sop_id]
    prefix = torch.tensor([len(part_a)])
    seq_limit = model.cfg.seq_length
    banned = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    banned[tok.vocab_size:] = True  # the padding rows of the embedding are never tokens
    for name, i in tok.special_ids.items():
        if name not in ("<eop>", "<eod>"):
            banned[i] = True
    out: list[int] = []
    for _ in range(cfg.max_new_tokens):
        window = ids[-seq_limit:]
        if len(ids) > seq_limit:  # keep the newest tokens; Part A shrinks from the left
            prefix = torch.tensor([max(0, len(part_a) - (len(ids) - seq_limit))])
        logits = model(torch.tensor([window]), prefix_lengths=prefix)[0, -1].float()
        logits = logits.masked_fill(banned, float("-inf"))
        if len(out) < cfg.min_new_tokens:
            logits[[tok.eop_id, tok.eod_id]] = float("-inf")
        if cfg.repetition_penalty != 1.0 and ids:
            seen = torch.tensor(sorted(set(ids)))
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.temperature <= 0:
            nxt = int(torch.argmax(logits))
        else:
            probs = torch.softmax(_filter(logits / cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt in (tok.eop_id, tok.eod_id):
            break
        ids.append(nxt)
        out.append(nxt)
    return tok.decode(out)
