"""Generation from a GLM under its blank-infilling layout: KV-cache decoding, [gMASK] continuation,
[MASK] blank filling, sampling and beam search, batches of prompts, tensor-parallel ranks.

Layout (the training format, data/blank_infilling.py): Part A is the prompt with its mask tokens,
encoded bidirectionally once; Part B is generated one token at a time, causal, seeing all of Part A.
Every blank is generated as ``<sop> t1 t2 ...`` until <eop> (which is a target, never an input):

* 1D RoPE: the tokens of a [MASK] blank all take the position of their [MASK]; a [gMASK] blank
  continues the positions after its [gMASK] (<sop> at len(Part A) when [gMASK] ends Part A).
* 2D RoPE: (position of the mask token, 1-based position within the blank) for Part B, (i, 0) for A.

Several blanks are filled one after another, each seeing the blanks before it (as in training,
where Part B holds all spans). Rows of a batch share one slot layout: Part A padded to the longest
prompt (left or right), then one Part-B slot per step; padded slots are never attended to.

With ``use_cache`` (default) Part A runs once and each step runs one token per row against the cached
keys/values; without it every step recomputes the whole sequence (the reference). Both go through the
same step loop, so they pick the same tokens up to float rounding of the logits.
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from glm_train.data.tokenizer import GLMTokenizer
from glm_train.model import GLMModel
from glm_train.model.attention import KVCache
from glm_train.parallel.state import tp_group, tp_world_size


@dataclass
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 64
    """Tokens to generate at most per blank (stops earlier at <eop>/<eod>)."""
    min_new_tokens: int = 0
    """Do not stop a blank (<eop>/<eod> are not sampled) before this many tokens."""
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
    num_beams: int = 1
    """1: sample (or greedy with temperature 0); >1: beam search with this many beams (temperature,
    top_k, top_p and seed unused)."""
    length_penalty: float = 1.0
    """Beam search ranks finished hypotheses by sum(log p) / length**length_penalty (0: raw sum)."""


class Mode(str, enum.Enum):
    gmask = "gmask"  # continue the prompt: Part A = prompt + [gMASK]
    mask = "mask"  # fill every [MASK] ([sMASK], [gMASK]) written in the prompt text


_BLANK_STRINGS = ("[MASK]", "[sMASK]", "[gMASK]")
_BLANK_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in _BLANK_STRINGS) + ")")


@dataclass
class Prompt:
    """One Part A and the blanks to fill in it, in generation order."""

    part_a: list[int]
    blanks: list[int]
    """Index in ``part_a`` of each blank's mask token."""
    continues: list[bool]
    """Per blank: 1D positions continue after the mask token ([gMASK]) rather than repeat it ([MASK])."""


@dataclass
class GenerationOutput:
    """Per prompt: the tokens of each blank (without <eop>) and how the blank ended."""

    blanks: list[list[list[int]]]
    ended: list[list[bool]]
    """True where the blank ended with <eop>/<eod>, False where it hit max_new_tokens."""
    scores: list[float] | None = None
    """Beam search: summed log-probability of the returned hypothesis (under the processed logits)."""
    step_logits: list[torch.Tensor] = field(default_factory=list)
    """With ``return_logits``: the processed logits [rows, V] of every step (sampling/greedy only)."""


# ------------------------------------------------------------------ prompts


def encode_prompt(tok: GLMTokenizer, text: str, mode: Mode | str = Mode.gmask,
                  seq_length: int | None = None, budget: int = 0) -> Prompt:
    """Part A and its blanks for ``text``.

    gmask: the text + [gMASK], one continuing blank; mask tokens inside the text stay plain context.
    When ``seq_length`` is given and Part A + ``budget`` generated tokens would not fit, the text is cut
    from the left, keeping at least half the window for Part A (longer continuations run past the
    training length, where RoPE extrapolates).
    mask: every [MASK]/[sMASK] (position repeated) and [gMASK] (positions continue) of the text, left
    to right.
    """
    mode = Mode(mode)
    ids = tok.encode(text)
    if mode == Mode.gmask:
        if seq_length is not None:
            keep = max(1, seq_length - 1 - min(budget, seq_length // 2))
            ids = ids[-keep:]
        part_a = ids + [tok.gmask_id]
        return Prompt(part_a, [len(part_a) - 1], [True])
    kinds = {tok.mask_id: False, tok.smask_id: False, tok.gmask_id: True}
    blanks = [i for i, t in enumerate(ids) if t in kinds]
    if not blanks:
        raise ValueError(f"mode=mask needs at least one [MASK] in the prompt: {text!r}")
    return Prompt(ids, blanks, [kinds[ids[i]] for i in blanks])


def render_filled(tok: GLMTokenizer, text: str, blanks: list[list[int]]) -> str:
    """``text`` with its i-th mask string replaced by the decoded i-th blank; the rest verbatim."""
    pieces = _BLANK_SPLIT.split(text)
    out: list[str] = []
    n = 0
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a mask string
            out.append(tok.decode(blanks[n]) if n < len(blanks) else piece)
            n += 1
        else:
            out.append(piece)
    return "".join(out)


# ------------------------------------------------------------------ the decoder: cached or recomputed


def _visibility(a_valid: torch.Tensor, t: int) -> torch.Tensor:
    """Mask [R, 1, S, S] for Part A (valid slots ``a_valid`` [R, La]) followed by ``t`` Part-B slots.

    Real Part-A queries see the real Part-A keys; Part-B queries see the real Part-A keys and the
    Part-B keys up to themselves; padded queries see only themselves (no empty softmax rows).
    """
    r, la = a_valid.shape
    s = la + t
    dev = a_valid.device
    idx = torch.arange(s, device=dev)
    real = torch.cat([a_valid, torch.ones(r, t, dtype=torch.bool, device=dev)], dim=1)  # [R, S]
    key_in_a = (idx < la).view(1, 1, s)
    sees_a = key_in_a & real.unsqueeze(2)
    sees_b = ((idx >= la).view(1, 1, s) & (idx >= la).view(1, s, 1) & (idx.view(1, 1, s) <= idx.view(1, s, 1)))
    vis = (sees_a | sees_b) & real.unsqueeze(1)
    vis = vis | torch.eye(s, dtype=torch.bool, device=dev).unsqueeze(0)
    return vis.unsqueeze(1)


class _Decoder:
    """Feeds one Part-B token per row and step; returns the next-token logits [R, V] (FP32)."""

    def __init__(self, model: GLMModel, a_ids: torch.Tensor, a_pos: torch.Tensor, a_valid: torch.Tensor,
                 use_cache: bool, capacity: int) -> None:
        self.model, self.use_cache = model, use_cache
        self.a_ids, self.a_pos, self.a_valid = a_ids, a_pos, a_valid
        self.b_ids: list[torch.Tensor] = []
        self.b_pos: list[torch.Tensor] = []
        self.cache: KVCache | None = None
        if use_cache:
            self.cache = KVCache(len(model.layers), capacity)
            model(a_ids, a_pos, attention_mask=_visibility(a_valid, 0), cache=self.cache, last_only=True)

    def step(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``ids`` [R], ``pos`` [R] (1D) or [R, 2] (2D)."""
        self.b_ids.append(ids)
        self.b_pos.append(pos)
        t = len(self.b_ids)
        if self.cache is not None:
            r = ids.shape[0]
            mask = torch.cat([self.a_valid, torch.ones(r, t, dtype=torch.bool, device=ids.device)], dim=1)
            logits = self.model(ids.unsqueeze(1), pos.unsqueeze(-1), attention_mask=mask.view(r, 1, 1, -1),
                                cache=self.cache, last_only=True)
        else:
            full_ids = torch.cat([self.a_ids, torch.stack(self.b_ids, dim=-1)], dim=-1)
            full_pos = torch.cat([self.a_pos, torch.stack(self.b_pos, dim=-1)], dim=-1)
            logits = self.model(full_ids, full_pos, attention_mask=_visibility(self.a_valid, t), last_only=True)
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        self.a_ids = self.a_ids.index_select(0, index)
        self.a_pos = self.a_pos.index_select(0, index)
        self.a_valid = self.a_valid.index_select(0, index)
        self.b_ids = [x.index_select(0, index) for x in self.b_ids]
        self.b_pos = [x.index_select(0, index) for x in self.b_pos]
        if self.cache is not None:
            self.cache.reorder(index)


# ------------------------------------------------------------------ per-row state machine


@dataclass
class _Hyp:
    """One row's progress: the blank being generated, the token to feed next, the tokens so far."""

    sample: int
    blank: int = 0
    k: int = 0  # index within the blank of the token fed next (0: its <sop>)
    pending: int = -1
    blanks: tuple[tuple[int, ...], ...] = ()
    ended: tuple[bool, ...] = ()
    length: int = 0  # tokens chosen so far (<eop>s included): the beam's length
    done: bool = False

    def count(self) -> int:
        return len(self.blanks[self.blank]) if self.blank < len(self.blanks) else 0


class _Rules:
    """Positions, stopping and the logits processing shared by sampling and beam search."""

    def __init__(self, tok: GLMTokenizer, prompts: list[Prompt], cfg: SamplingConfig, vocab: int,
                 two_d: bool, device: torch.device) -> None:
        self.tok, self.prompts, self.cfg, self.two_d, self.device = tok, prompts, cfg, two_d, device
        self.stops = (tok.eop_id, tok.eod_id)
        banned = torch.zeros(vocab, dtype=torch.bool, device=device)
        banned[tok.vocab_size:] = True  # the padding rows of the embedding are never tokens
        for name, i in tok.special_ids.items():
            if name not in ("<eop>", "<eod>"):
                banned[i] = True
        self.banned = banned

    def start(self, sample: int) -> _Hyp:
        n = len(self.prompts[sample].blanks)
        return _Hyp(sample, pending=self.tok.sop_id, blanks=((),) * n, ended=(False,) * n)

    def position(self, h: _Hyp) -> list[int]:
        p = self.prompts[h.sample]
        if h.done:
            return [0, 0] if self.two_d else [0]
        m = p.blanks[h.blank]
        if self.two_d:
            return [m, h.k + 1]
        return [m + 1 + h.k if p.continues[h.blank] else m]

    def inputs(self, rows: list[_Hyp]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([h.pending if not h.done else self.tok.pad_id for h in rows], device=self.device)
        pos = torch.tensor([self.position(h) for h in rows], device=self.device)
        return ids, (pos if self.two_d else pos[:, 0])

    def advance(self, h: _Hyp, token: int) -> _Hyp:
        """The row after choosing ``token``: append it, or close the blank on <eop>/<eod>."""
        last = h.blank == len(h.blanks) - 1
        n = _Hyp(h.sample, h.blank, h.k, h.pending, h.blanks, h.ended, h.length + 1, h.done)
        if token in self.stops:
            by_model = len(h.blanks[h.blank]) < self.cfg.max_new_tokens  # else the <eop> was forced
            n.ended = h.ended[:n.blank] + (by_model,) + h.ended[n.blank + 1:]
            return self._next_blank(n, last)
        n.blanks = h.blanks[:n.blank] + (h.blanks[n.blank] + (token,),) + h.blanks[n.blank + 1:]
        if last and len(n.blanks[n.blank]) >= self.cfg.max_new_tokens:
            n.done = True  # the last blank is full: nothing more to feed
            return n
        n.pending, n.k = token, h.k + 1  # a full earlier blank still feeds its last token (forced <eop>)
        return n

    def _next_blank(self, n: _Hyp, last: bool) -> _Hyp:
        if last:
            n.done = True
        else:
            n.blank, n.k, n.pending = n.blank + 1, 0, self.tok.sop_id
        return n

    def process(self, logits: torch.Tensor, rows: list[_Hyp], seen: torch.Tensor) -> torch.Tensor:
        """Ban non-text ids; defer stops before min_new_tokens; repetition penalty; force <eop> on a
        full blank."""
        logits = logits.masked_fill(self.banned, float("-inf"))
        counts = torch.tensor([h.count() for h in rows], device=logits.device)
        early = (counts < self.cfg.min_new_tokens).unsqueeze(1)
        stop_cols = torch.zeros_like(self.banned)
        stop_cols[list(self.stops)] = True
        logits = logits.masked_fill(early & stop_cols, float("-inf"))
        if self.cfg.repetition_penalty != 1.0:
            rp = self.cfg.repetition_penalty
            pen = torch.where(logits > 0, logits / rp, logits * rp)
            logits = torch.where(seen, pen, logits)
        full = (counts >= self.cfg.max_new_tokens).unsqueeze(1)
        if bool(full.any()):
            only_eop = torch.full_like(logits, float("-inf"))
            only_eop[:, self.tok.eop_id] = 0.0
            logits = torch.where(full, only_eop, logits)
        return logits


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of logits [R, V]."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _tp_broadcast(t: torch.Tensor) -> torch.Tensor:
    """Every TP rank takes TP rank 0's choice (the logits agree already; this makes it certain)."""
    if tp_world_size() > 1:
        group = tp_group()
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return t


# ------------------------------------------------------------------ the loops


def _layout(model: GLMModel, prompts: list[Prompt], padding: str, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', not {padding!r}")
    la = max(len(p.part_a) for p in prompts)
    b = len(prompts)
    ids = torch.full((b, la), 0, dtype=torch.long)
    pos = torch.zeros((b, la), dtype=torch.long)
    valid = torch.zeros((b, la), dtype=torch.bool)
    for i, p in enumerate(prompts):
        n = len(p.part_a)
        sl = slice(la - n, la) if padding == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(p.part_a)
        pos[i, sl] = torch.arange(n)
        valid[i, sl] = True
    if model.two_d:
        pos = torch.stack([pos, torch.zeros_like(pos)], dim=1)
    return ids.to(device), pos.to(device), valid.to(device)


def _seen(prompts: list[Prompt], vocab: int, device: torch.device) -> torch.Tensor:
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p.part_a)] = True
    return seen.to(device)


@torch.no_grad()
def generate_ids(model: GLMModel, tok: GLMTokenizer, prompts: list[Prompt], cfg: SamplingConfig | None = None,
                 *, use_cache: bool = True, padding: str = "left", return_logits: bool = False) -> GenerationOutput:
    """Fill the blanks of each prompt; the same loop with or without the KV cache."""
    cfg = cfg or SamplingConfig()
    if cfg.num_beams > 1:
        return beam_search(model, tok, prompts, cfg, use_cache=use_cache, padding=padding)
    if cfg.max_new_tokens < 1:
        return GenerationOutput([[[] for _ in p.blanks] for p in prompts], [[False] * len(p.blanks) for p in prompts])
    device, vocab, rules, dec, max_steps = _setup(model, tok, prompts, cfg, use_cache, padding)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    seen = _seen(prompts, vocab, device)
    rows = [rules.start(i) for i in range(len(prompts))]
    out = GenerationOutput([], [])
    for _ in range(max_steps):
        if all(h.done for h in rows):
            break
        ids, pos = rules.inputs(rows)
        seen[torch.arange(len(rows), device=device), ids] = True
        logits = rules.process(dec.step(ids, pos), rows, seen)
        if return_logits:
            out.step_logits.append(logits)
        if cfg.temperature <= 0:
            nxt = torch.argmax(logits, dim=-1)
        else:
            probs = torch.softmax(_filter(logits / cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        nxt = _tp_broadcast(nxt.contiguous())
        rows = [h if h.done else rules.advance(h, int(t)) for h, t in zip(rows, nxt.tolist(), strict=True)]
    out.blanks = [[list(b) for b in h.blanks] for h in rows]
    out.ended = [list(h.ended) for h in rows]
    return out


def _setup(model: GLMModel, tok: GLMTokenizer, prompts: list[Prompt], cfg: SamplingConfig, use_cache: bool,
           padding: str) -> tuple[torch.device, int, _Rules, _Decoder, int]:
    """What sampling and beam search share: device, vocabulary, rules, Part A encoded, the step budget."""
    device = next(model.parameters()).device
    vocab = int(model.cfg.vocab_size or 0)
    rules = _Rules(tok, prompts, cfg, vocab, model.two_d, device)
    a_ids, a_pos, a_valid = _layout(model, prompts, padding, device)
    max_steps = max(len(p.blanks) for p in prompts) * (cfg.max_new_tokens + 1)
    dec = _Decoder(model, a_ids, a_pos, a_valid, use_cache, a_ids.shape[1] + max_steps)
    return device, vocab, rules, dec, max_steps


@torch.no_grad()
def beam_search(model: GLMModel, tok: GLMTokenizer, prompts: list[Prompt], cfg: SamplingConfig, *,
                use_cache: bool = True, padding: str = "left") -> GenerationOutput:
    """Beam search over all blanks of each prompt (``cfg.num_beams`` beams, even 1).

    Scores are summed model log-probabilities of the chosen tokens (<eop>s included); as in Hugging
    Face, the rules act on the log-probabilities without renormalizing (special ids and early stops get
    -inf, a forced <eop> gets 0, the repetition penalty scales them); no temperature. A hypothesis
    is finished at the <eop> of its last blank or when that blank is full; finished ones are ranked
    by score / length**length_penalty. A prompt stops once it has num_beams finished hypotheses and
    no running beam can still beat the worst of them (Hugging Face's default heuristic).
    """
    k_beams = max(1, cfg.num_beams)
    b = len(prompts)
    if cfg.max_new_tokens < 1:
        return GenerationOutput([[[] for _ in p.blanks] for p in prompts], [[False] * len(p.blanks) for p in prompts],
                                [0.0] * b)
    device, vocab, rules, dec, max_steps = _setup(model, tok, prompts, cfg, use_cache, padding)
    expand = torch.arange(b, device=device).repeat_interleave(k_beams)
    dec.reorder(expand)
    seen = _seen(prompts, vocab, device).index_select(0, expand)
    rows = [rules.start(i) for i in range(b) for _ in range(k_beams)]
    scores = torch.full((b, k_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # identical beams at the start: only the first one is live
    finished: list[list[tuple[float, float, _Hyp]]] = [[] for _ in range(b)]  # (normalized, score, hyp)
    sample_done = [False] * b
    lp = cfg.length_penalty

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** lp)

    def add_finished(i: int, score: float, h: _Hyp) -> None:
        finished[i].append((norm(score, h.length), score, h))
        finished[i].sort(key=lambda x: -x[0])
        del finished[i][k_beams:]

    for _ in range(max_steps):
        if all(sample_done):
            break
        ids, pos = rules.inputs(rows)
        seen[torch.arange(len(rows), device=device), ids] = True
        logp = rules.process(torch.log_softmax(dec.step(ids, pos), dim=-1), rows, seen)
        cand = (scores.view(-1, 1) + logp).view(b, k_beams * vocab)
        top_v, top_i = torch.topk(cand, 2 * k_beams, dim=-1)
        top_i = _tp_broadcast(top_i.contiguous())
        top_v = _tp_broadcast(top_v.contiguous())
        new_rows: list[_Hyp] = []
        new_index: list[int] = []
        new_scores = torch.full((b, k_beams), float("-inf"), device=device)
        for i in range(b):
            base = i * k_beams
            if sample_done[i]:
                new_rows.extend(rows[base:base + k_beams])
                new_index.extend(range(base, base + k_beams))
                continue
            picked = 0
            for rank, (v, flat) in enumerate(zip(top_v[i].tolist(), top_i[i].tolist(), strict=True)):
                if v == float("-inf"):
                    break
                beam, token = divmod(flat, vocab)
                h = rules.advance(rows[base + beam], token)
                if h.done:
                    if rank < k_beams:
                        add_finished(i, v, h)
                    continue
                new_rows.append(h)
                new_index.append(base + beam)
                new_scores[i, picked] = v
                picked += 1
                if picked == k_beams:
                    break
            for _ in range(picked, k_beams):  # too few live candidates: dead filler rows
                new_rows.append(_Hyp(i, pending=tok.pad_id, blanks=rows[base].blanks, ended=rows[base].ended,
                                     done=True))
                new_index.append(base)
            best_running = float(new_scores[i].max())
            if picked == 0:
                sample_done[i] = True
            elif len(finished[i]) >= k_beams:
                length = max(h.length for h in new_rows[-k_beams:])
                sample_done[i] = finished[i][-1][0] >= norm(best_running, length)
        idx = torch.tensor(new_index, device=device)
        dec.reorder(idx)
        seen = seen.index_select(0, idx)
        rows, scores = new_rows, new_scores
    flat_scores = scores.view(-1).tolist()
    for i in range(b):
        if not sample_done[i]:  # out of steps: the running beams compete as they are
            for j in range(i * k_beams, (i + 1) * k_beams):
                if flat_scores[j] != float("-inf"):
                    add_finished(i, flat_scores[j], rows[j])
    out = GenerationOutput([], [], [])
    for i in range(b):
        _, score, h = finished[i][0]
        out.blanks.append([list(x) for x in h.blanks])
        out.ended.append(list(h.ended))
        assert out.scores is not None
        out.scores.append(score)
    return out


# ------------------------------------------------------------------ text in, text out


def _budget(cfg: SamplingConfig) -> int:
    return cfg.max_new_tokens


def generate_batch(model: GLMModel, tok: GLMTokenizer, texts: list[str], cfg: SamplingConfig | None = None, *,
                   mode: Mode | str = Mode.gmask, use_cache: bool = True, padding: str = "left") -> list[str]:
    """gmask: the continuation of each text; mask: each text with its [MASK]s filled."""
    cfg = cfg or SamplingConfig()
    mode = Mode(mode)
    prompts = [encode_prompt(tok, t, mode, model.cfg.seq_length, _budget(cfg)) for t in texts]
    out = generate_ids(model, tok, prompts, cfg, use_cache=use_cache, padding=padding)
    if mode == Mode.gmask:
        return [tok.decode(b[0]) for b in out.blanks]
    return [render_filled(tok, t, b) for t, b in zip(texts, out.blanks, strict=True)]


def generate(model: GLMModel, tok: GLMTokenizer, prompt: str, cfg: SamplingConfig | None = None, *,
             mode: Mode | str = Mode.gmask, use_cache: bool = True) -> str:
    """gmask: continue ``prompt`` (Part A = prompt + [gMASK], Part B = <sop> + generated tokens) and
    return the continuation; mask: return ``prompt`` with every [MASK] filled."""
    return generate_batch(model, tok, [prompt], cfg, mode=mode, use_cache=use_cache)[0]


def benchmark_decode(model: GLMModel, tok: GLMTokenizer, prompt: str, new_tokens: int, use_cache: bool,
                     batch: int = 1) -> float:
    """Decoding speed in generated tokens/s: greedy [gMASK] continuation of ``prompt`` forced to exactly
    ``new_tokens`` tokens per row (Part A encoding included in the time)."""
    cfg = SamplingConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, temperature=0.0,
                         repetition_penalty=1.0)
    prompts = [encode_prompt(tok, prompt, Mode.gmask, model.cfg.seq_length, _budget(cfg))] * batch
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = generate_ids(model, tok, prompts, cfg, use_cache=use_cache)
    sync()
    elapsed = time.perf_counter() - t0
    n = sum(len(b[0]) for b in out.blanks)
    return n / elapsed if elapsed > 0 else math.inf


def sequence_logprob(model: GLMModel, prompt: Prompt, blanks: list[list[int]], ended: list[bool],
                     tok: GLMTokenizer) -> float:
    """Summed log-probability of filled blanks under one full forward in the training layout (Part A,
    then each blank as <sop> + tokens; targets tokens + <eop> where the blank ended with one). Raw
    model log-probabilities: no banning or penalties."""
    two_d = model.two_d
    ids = list(prompt.part_a)
    pos1 = list(range(len(ids)))
    pos2 = [0] * len(ids)
    targets: list[int] = [-1] * len(ids)
    for j, (m, cont, span) in enumerate(zip(prompt.blanks, prompt.continues, blanks, strict=True)):
        inputs = [tok.sop_id] + span
        tgt = span + [tok.eop_id if ended[j] else -1]
        if not ended[j]:  # a blank cut at max_new_tokens: its last token is only fed if a blank follows
            if j == len(blanks) - 1:
                inputs, tgt = inputs[:-1], tgt[:-1]
        for k in range(len(inputs)):
            pos1.append(m if two_d or not cont else m + 1 + k)
            pos2.append(k + 1)
        ids.extend(inputs)
        targets.extend(tgt)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    position_ids = torch.tensor([[pos1, pos2]] if two_d else [pos1], device=device)
    with torch.no_grad():
        logits = model(input_ids, position_ids, torch.tensor([len(prompt.part_a)], device=device))[0].float()
    logp = F.log_softmax(logits, dim=-1)
    t = torch.tensor(targets, device=device)
    keep = t >= 0
    return float(logp[keep].gather(1, t[keep].unsqueeze(1)).sum())
