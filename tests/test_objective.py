"""Blank-infilling sample builder: statistics, reconstruction, loss mask, positions, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from glm_train.config import ObjectiveConfig
from glm_train.data.blank_infilling import SpecialIds, build_gmask_sample, build_mask_sample, build_sample

IDS = SpecialIds(mask=1000, gmask=1001, sop=1004, eop=1005, pad=1006, eod=1003)
S = 256
TEXT = np.arange(S - 2, dtype=np.int64)  # distinct tokens make reconstruction checks exact


def _samples(n: int, cfg: ObjectiveConfig, text: np.ndarray = TEXT, two_d: bool = False):
    return [build_sample(text, np.random.default_rng([42, i]), S, cfg, IDS, two_d) for i in range(n)]


def _reconstruct(s) -> list[int]:
    """Original text from Part A and Part B: fill each [MASK] with the span generated for it."""
    part_a = s.input_ids[: s.prefix_length].tolist()
    b_in = s.input_ids[s.prefix_length:]
    b_pos = s.position_ids[s.prefix_length:] if s.position_ids.ndim == 1 else s.position_ids[0, s.prefix_length:]
    spans: dict[int, list[int]] = {}
    i = 0
    while i < len(b_in) and b_in[i] == IDS.sop:
        j = i + 1
        while j < len(b_in) and b_in[j] not in (IDS.sop, IDS.pad):
            j += 1
        spans[int(b_pos[i])] = b_in[i + 1:j].tolist()
        i = j
    out: list[int] = []
    for p, t in enumerate(part_a):
        if t == IDS.mask:
            out.extend(spans[p])
        elif t == IDS.gmask:
            out.extend(next(iter(spans.values())))
        else:
            out.append(t)
    return out


def test_mask_gmask_ratio_and_masked_share():
    cfg = ObjectiveConfig(short_seq_prob=0.0, single_span_prob=0.0)
    samples = _samples(4000, cfg)
    kinds = np.array([s.kind == "mask" for s in samples])
    # Binomial(4000, 0.3): sd = 0.0072; 4 sd tolerance.
    assert abs(kinds.mean() - 0.3) < 0.03
    shares, lengths, gshares = [], [], []
    for s in samples:
        n_text = len(_reconstruct(s))
        masked = sum(e - b for b, e in s.spans)
        if s.kind == "mask":
            shares.append(masked / n_text)
            lengths += [e - b for b, e in s.spans]
        else:
            gshares.append(masked / n_text)
    assert abs(np.mean(shares) - 0.15) < 0.005
    # Span lengths: max(1, Poisson(3)) has mean 3 + P(0) = 3.0498.
    expected = 3.0 + np.exp(-3.0)
    assert abs(np.mean(lengths) - expected) < 0.1
    # [gMASK] share ~ U[0.2, 1): mean 0.6, sd 0.23 / sqrt(2800) ~ 0.0044.
    assert abs(np.mean(gshares) - 0.6) < 0.02
    assert min(gshares) >= 0.195 and max(gshares) <= 1.0


@pytest.mark.parametrize("two_d", [False, True])
def test_parts_recover_text_and_loss_covers_part_b_only(two_d):
    for s in _samples(300, ObjectiveConfig(), two_d=two_d):
        n_text = len(_reconstruct(s))
        assert _reconstruct(s) == TEXT[:n_text].tolist()
        n = int((s.input_ids != IDS.pad).sum())
        assert s.loss_mask[: s.prefix_length].sum() == 0
        assert (s.loss_mask[s.prefix_length:n] == 1).all() and (s.loss_mask[n:] == 0).all()
        # Targets: Part-B input shifted left; every span ends with <eop>.
        b_in, b_tgt = s.input_ids[s.prefix_length:n], s.targets[s.prefix_length:n]
        starts = np.nonzero(b_in == IDS.sop)[0].tolist() + [len(b_in)]
        for a, b in zip(starts, starts[1:]):
            assert b_tgt[a:b - 1].tolist() == b_in[a + 1:b].tolist()
            assert b_tgt[b - 1] == IDS.eop


def test_mask_spans_are_shuffled_in_part_b():
    orders = []
    for s in _samples(400, ObjectiveConfig(mask_prob=1.0)):
        pos = s.position_ids[s.prefix_length:]
        starts = s.input_ids[s.prefix_length:] == IDS.sop
        orders.append(list(pos[starts]))
    assert any(o != sorted(o) for o in orders) and any(o == sorted(o) for o in orders)


def test_positions_1d_mask_takes_mask_position_and_gmask_continues():
    s = build_mask_sample(TEXT[:60], [3, 2], np.random.default_rng(0), 64, IDS)
    a = s.input_ids[: s.prefix_length]
    mask_positions = np.nonzero(a == IDS.mask)[0]
    b_pos = s.position_ids[s.prefix_length: s.prefix_length + 7]
    assert set(b_pos.tolist()) == set(mask_positions.tolist())
    g = build_gmask_sample(TEXT[:60], 0.5, 64, IDS)
    n = int((g.input_ids != IDS.pad).sum())
    assert g.position_ids[:n].tolist() == list(range(n))
    assert g.input_ids[g.prefix_length - 1] == IDS.gmask and g.input_ids[g.prefix_length] == IDS.sop


def test_deterministic_in_seed_and_index():
    a = _samples(20, ObjectiveConfig())
    b = _samples(20, ObjectiveConfig())
    for x, y in zip(a, b):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.position_ids, y.position_ids)
    c = build_sample(TEXT, np.random.default_rng([43, 0]), S, ObjectiveConfig(), IDS)
    assert any(not np.array_equal(c.input_ids, s.input_ids) for s in a[:1]) or c.kind != a[0].kind


def test_short_windows_still_fit():
    for n in [2, 3, 5, 9, 20]:
        for s in _samples(50, ObjectiveConfig(), text=TEXT[:n]):
            assert len(s.input_ids) == S
            assert _reconstruct(s) == TEXT[: len(_reconstruct(s))].tolist()
