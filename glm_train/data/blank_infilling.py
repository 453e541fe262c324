"""Autoregressive blank infilling: turn a token window into one GLM training sample (SPEC.md).

Layout of a sample of ``seq_length`` tokens::

    Part A: text with each masked span replaced by one [MASK] (or the kept prefix + [gMASK])
    Part B: for each span, in random order: inputs <sop> + span, targets span + <eop>
    padding: <pad>, no loss

The attention mask is defined by ``prefix_length`` = len(Part A): Part A is bidirectional, Part B
causal. Positions (1D, GLM-130B): a [MASK] span's Part-B tokens all take the position of their
[MASK]; a [gMASK] continuation simply continues. 2D (original GLM): (position of the mask token,
1-based position within the span) for Part B, (position, 0) for Part A.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glm_train.config import ObjectiveConfig


@dataclass(frozen=True)
class SpecialIds:
    mask: int
    gmask: int
    sop: int
    eop: int
    pad: int
    eod: int


@dataclass
class Sample:
    input_ids: np.ndarray  # [S] int64
    targets: np.ndarray  # [S] int64
    loss_mask: np.ndarray  # [S] float32, 1 on Part B targets
    position_ids: np.ndarray  # [S] or [2, S] int64
    prefix_length: int  # len(Part A)
    kind: str  # "mask" or "gmask"
    spans: list[tuple[int, int]]  # masked (start, end) ranges of the original window


def _span_lengths(
    rng: np.random.Generator, text_len: int, seq_length: int, cfg: ObjectiveConfig
) -> list[int]:
    """Poisson span lengths until mask_ratio of the text is covered.

    Each span costs two extra tokens (its [MASK] in Part A and <sop> in Part B), so the text window
    shrinks as spans are added; the budget is taken against that shrinking window.
    """
    lengths: list[int] = []
    if rng.random() < cfg.single_span_prob:
        text = min(text_len, seq_length - 2)
        return [max(1, round(cfg.mask_ratio * text))]
    while True:
        text = min(text_len, seq_length - 2 * len(lengths))
        budget = cfg.mask_ratio * text
        total = sum(lengths)
        if total >= budget or text - total < 2:
            break
        n = max(1, int(rng.poisson(cfg.poisson_lambda)))
        # Stop rather than add a span that would overshoot the budget by more than it now falls
        # short: the masked share stays centred on mask_ratio without truncating span lengths.
        if lengths and total + n - budget > budget - total:
            break
        lengths.append(n)
    return lengths


def build_mask_sample(
    text: np.ndarray,
    lengths: list[int],
    rng: np.random.Generator,
    seq_length: int,
    ids: SpecialIds,
    two_d: bool = False,
) -> Sample:
    """[MASK] corruption of ``text`` with the given span lengths; ``text`` is cut to fit."""
    k = len(lengths)
    n = min(len(text), seq_length - 2 * k)
    text = text[:n]
    masked = min(sum(lengths), n - 1)
    if sum(lengths) > masked:  # a short window: drop spans until they fit
        while lengths and sum(lengths) > masked:
            lengths = lengths[:-1]
        k = len(lengths)
        if k == 0:
            lengths, k = [1], 1
    unmasked = n - sum(lengths)
    # Where each span sits among the unmasked tokens: k sorted gap offsets (adjacent spans allowed).
    offsets = np.sort(rng.integers(0, unmasked + 1, size=k))
    order = rng.permutation(k)
    spans: list[tuple[int, int]] = []
    part_a: list[int] = []
    pos_a: list[int] = []
    mask_pos: list[int] = []
    cursor = 0
    consumed_unmasked = 0
    for i in range(k):
        take = int(offsets[i]) - consumed_unmasked
        part_a.extend(text[cursor : cursor + take].tolist())
        cursor += take
        consumed_unmasked += take
        mask_pos.append(len(part_a))
        part_a.append(ids.mask)
        spans.append((cursor, cursor + lengths[i]))
        cursor += lengths[i]
    part_a.extend(text[cursor:].tolist())
    pos_a = list(range(len(part_a)))
    inputs, targets, pos1, pos2 = list(part_a), [ids.pad] * len(part_a), list(pos_a), [0] * len(part_a)
    for j in order:
        s, e = spans[j]
        span = text[s:e].tolist()
        inputs.extend([ids.sop] + span)
        targets.extend(span + [ids.eop])
        pos1.extend([mask_pos[j]] * (len(span) + 1))
        pos2.extend(range(1, len(span) + 2))
    return _finish(inputs, targets, pos1, pos2, len(part_a), seq_length, ids, two_d, "mask", spans)


def build_gmask_sample(
    text: np.ndarray, ratio: float, seq_length: int, ids: SpecialIds, two_d: bool = False
) -> Sample:
    """[gMASK] corruption: keep the first (1-ratio) of ``text``, generate the rest."""
    n = min(len(text), seq_length - 2)
    text = text[:n]
    gen = min(n - 1, max(1, round(n * ratio))) if n > 1 else n
    keep = n - gen
    part_a = text[:keep].tolist() + [ids.gmask]
    span = text[keep:].tolist()
    inputs = part_a + [ids.sop] + span
    targets = [ids.pad] * len(part_a) + span + [ids.eop]
    p = len(part_a)
    if two_d:
        pos1 = list(range(p)) + [p - 1] * (len(span) + 1)
        pos2 = [0] * p + list(range(1, len(span) + 2))
    else:
        pos1 = list(range(len(inputs)))
        pos2 = [0] * len(inputs)
    return _finish(inputs, targets, pos1, pos2, p, seq_length, ids, two_d, "gmask", [(keep, n)])


def _finish(
    inputs: list[int],
    targets: list[int],
    pos1: list[int],
    pos2: list[int],
    prefix: int,
    seq_length: int,
    ids: SpecialIds,
    two_d: bool,
    kind: str,
    spans: list[tuple[int, int]],
) -> Sample:
    n = len(inputs)
    assert n <= seq_length, (n, seq_length)
    pad = seq_length - n
    input_ids = np.asarray(inputs + [ids.pad] * pad, dtype=np.int64)
    tgt = np.asarray(targets + [ids.pad] * pad, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    loss_mask[prefix:n] = 1.0
    # Padding continues the last position so RoPE angles stay in range; it is never attended to.
    last1 = pos1[-1] if pos1 else 0
    p1 = np.asarray(pos1 + [last1] * pad, dtype=np.int64)
    p2 = np.asarray(pos2 + [0] * pad, dtype=np.int64)
    position_ids = np.stack([p1, p2]) if two_d else p1
    return Sample(input_ids, tgt, loss_mask, position_ids, prefix, kind, spans)


def build_sample(
    text: np.ndarray,
    rng: np.random.Generator,
    seq_length: int,
    cfg: ObjectiveConfig,
    ids: SpecialIds,
    two_d: bool = False,
) -> Sample:
    """One training sample from a token window: [MASK] with probability ``mask_prob``, else [gMASK]."""
    if rng.random() < cfg.short_seq_prob and len(text) > 8:
        text = text[: int(rng.integers(8, len(text) + 1))]
    if rng.random() < cfg.mask_prob:
        return build_mask_sample(
            text, _span_lengths(rng, len(text), seq_length, cfg), rng, seq_length, ids, two_d
        )
    ratio = float(rng.uniform(cfg.min_gmask_ratio, 1.0))
    return build_gmask_sample(text, ratio, seq_length, ids, two_d)
