"""Multi-task Instruction Pre-training (MIP) data: reader and sample builder (SPEC.md, "Data").

On disk (written by ``glm-build-mip``, :mod:`data_tools.mip`) a MIP dataset is an indexed dataset
(:mod:`glm_train.data.indexed`) whose document ``i`` is the prompt's tokens followed by the
target's tokens, plus two sidecars:

* ``<prefix>.mip.npy``: ``int32`` prompt length (tokens) of every document;
* ``<prefix>.mip.json``: provenance (source datasets, counts before/after the cap, seed, ...).

Both are written before the indexed ``<prefix>.json`` marker, so a dataset whose ``.json`` exists
has all of them.

A training sample puts the prompt in Part A and the answer in Part B, like a [gMASK] sample::

    Part A: prompt + [gMASK]            (bidirectional, no loss)
    Part B: <sop> + target              (causal), targets: target + <eop>
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from glm_train.data.blank_infilling import Sample, SpecialIds, _finish
from glm_train.data.indexed import IndexedDataset

MIP_FORMAT = "glm_train.mip"
MIP_VERSION = 1


def mip_paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(<prefix>.mip.npy, <prefix>.mip.json)``."""
    p = str(prefix)
    return Path(p + ".mip.npy"), Path(p + ".mip.json")


class MIPDataset:
    """Read-only view of a MIP dataset: ``ds[i] -> (prompt, target)`` token views (zero-copy)."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        self.indexed = IndexedDataset(prefix)
        npy_path, json_path = mip_paths(prefix)
        for p in (npy_path, json_path):
            if not p.is_file():
                raise FileNotFoundError(f"MIP sidecar missing: {p} (is {prefix} a MIP dataset?)")
        try:
            self.meta: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"unreadable MIP metadata {json_path}: {e}") from e
        if self.meta.get("format") != MIP_FORMAT or self.meta.get("version") != MIP_VERSION:
            raise ValueError(
                f"{json_path}: not a {MIP_FORMAT} v{MIP_VERSION} file "
                f"(format={self.meta.get('format')!r}, version={self.meta.get('version')!r})"
            )
        try:
            lengths = np.load(npy_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"corrupt MIP sidecar {npy_path}: {e}") from e
        n_docs = len(self.indexed)
        if lengths.dtype != np.int32 or lengths.shape != (n_docs,):
            raise ValueError(
                f"{npy_path}: expected int32 prompt lengths of shape ({n_docs},) to match "
                f"{n_docs} documents, got {lengths.dtype} {lengths.shape}; sidecar and dataset disagree"
            )
        # The sidecar and the token files are replaced separately: counts recorded at build time
        # catch a sidecar left over from another build that happens to have the same doc count.
        for key, have in (("n_docs", n_docs), ("n_tokens", self.indexed.n_tokens)):
            if int(self.meta.get(key, -1)) != have:
                raise ValueError(
                    f"{json_path}: {key}={self.meta.get(key)} but the indexed dataset has {have}; "
                    "the MIP sidecars belong to a different build"
                )
        doc_lengths = self.indexed.doc_lengths
        bad = np.flatnonzero((lengths < 0) | (lengths >= doc_lengths))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{npy_path}: {bad.size} documents have an invalid prompt length, e.g. document {i}: "
                f"prompt length {int(lengths[i])}, document length {int(doc_lengths[i])} "
                "(every document needs 0 <= prompt < length, i.e. a non-empty target)"
            )
        self._prompt_lengths = lengths

    def __len__(self) -> int:
        return len(self.indexed)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(prompt, target)`` of document ``i`` as read-only views into the memmap."""
        doc = self.indexed[i]  # bounds-checked, negative indices allowed
        p = int(self._prompt_lengths[i])
        return doc[:p], doc[p:]

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Prompt length (tokens) of every document."""
        return self._prompt_lengths

    @property
    def target_lengths(self) -> np.ndarray:
        """Target length (tokens) of every document."""
        return self.indexed.doc_lengths - self._prompt_lengths

    @property
    def vocab_size(self) -> int:
        """Vocabulary size the data was written with."""
        return self.indexed.vocab_size

    def __repr__(self) -> str:
        return f"MIPDataset({str(self.prefix)!r}, n_docs={len(self)}, n_tokens={self.indexed.n_tokens})"


def mip_lengths(prompt_len: int, target_len: int, seq_length: int) -> tuple[int, int]:
    """How many prompt and target tokens a sample of ``seq_length`` keeps.

    Policy: a sample needs ``prompt + 2 + target <= seq_length`` ([gMASK] and <sop>). When both do
    not fit, the target is guaranteed ``min(len(target), (seq_length - 2) // 2)`` tokens and the
    prompt gets the rest of the budget; any room the prompt does not need goes to the target. So a
    short answer is never cut, and a long prompt cannot squeeze the answer below half the budget.
    The prompt is cut from the LEFT (the instruction next to the answer is kept), the target from
    the RIGHT.
    """
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2 ([gMASK] and <sop>), got {seq_length}")
    budget = seq_length - 2
    t_keep = min(target_len, max(budget - prompt_len, budget // 2))
    p_keep = min(prompt_len, budget - t_keep)
    return p_keep, t_keep


def build_mip_sample(
    prompt: np.ndarray, target: np.ndarray, seq_length: int, ids: SpecialIds, two_d: bool = False
) -> Sample:
    """One MIP training sample: prompt + [gMASK] in Part A, <sop> + target in Part B.

    Lengths follow :func:`mip_lengths`. Part B inputs are ``<sop> + target[:k]`` and its targets
    ``(target + <eop>)[:k + 1]``: when the target is cut, the last position predicts the real next
    target token instead of <eop>, so a cut answer never teaches the model to stop early. Loss is on
    Part B only. Positions: 1D continue through Part B; 2D give Part B (position of [gMASK],
    1-based index within the span), Part A (position, 0), as for [gMASK] blank infilling.
    ``spans`` holds the kept target's range within the document ``prompt + target``.
    """
    prompt = np.asarray(prompt)
    target = np.asarray(target)
    p_keep, t_keep = mip_lengths(len(prompt), len(target), seq_length)
    part_a = prompt[len(prompt) - p_keep :].tolist() + [ids.gmask]
    full = target.tolist() + [ids.eop]
    inputs = part_a + [ids.sop] + full[:t_keep]
    targets = [ids.pad] * len(part_a) + full[: t_keep + 1]
    p = len(part_a)
    if two_d:
        pos1 = list(range(p)) + [p - 1] * (t_keep + 1)
        pos2 = [0] * p + list(range(1, t_keep + 2))
    else:
        pos1 = list(range(len(inputs)))
        pos2 = [0] * len(inputs)
    span = [(len(prompt), len(prompt) + t_keep)]
    return _finish(inputs, targets, pos1, pos2, p, seq_length, ids, two_d, "mip", span)


__all__ = ["MIPDataset", "build_mip_sample", "mip_lengths", "mip_paths"]
