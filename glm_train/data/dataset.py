"""Training and validation samples from indexed token datasets.

Each dataset is read as one stream: its documents in order, each followed by <eod>. The stream is
cut into windows of ``seq_length - 2`` tokens (room for the mask token and <sop>). Sample ``i`` of
the mixture is a deterministic function of (seed, i): epoch ``i // N`` shuffles the N windows of all
datasets with seed (seed, epoch), so a resumed run only needs the number of consumed samples.
With ``weights``, each source gets that share of every epoch's N slots and cycles through its own
shuffled windows, reshuffled on every pass (a source given more than its natural share is repeated,
less is subsampled; either way it wraps around without a gap). An MIP source counts one slot per
prompted sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glm_train.config import ObjectiveConfig
from glm_train.data.blank_infilling import Sample, SpecialIds, build_gmask_sample, build_sample
from glm_train.data.indexed import IndexedDataset


class TokenStream:
    """A dataset's documents as one stream with <eod> after each document."""

    def __init__(self, ds: IndexedDataset, eod: int) -> None:
        self.ds, self.eod = ds, eod
        lengths = np.asarray(ds.doc_lengths, dtype=np.int64) + 1
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each document
        self.doc_offsets = np.concatenate([[0], np.cumsum(np.asarray(ds.doc_lengths, dtype=np.int64))])
        self.length = int(self.doc_starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        pos, filled = start, 0
        doc = int(np.searchsorted(self.doc_starts, start, side="right") - 1)
        while filled < length and doc < len(self.doc_starts) - 1:
            within = pos - int(self.doc_starts[doc])
            doc_len = int(self.doc_starts[doc + 1] - self.doc_starts[doc]) - 1
            take_text = max(0, min(doc_len - within, length - filled))
            if take_text:
                base = int(self.doc_offsets[doc]) + within
                out[filled:filled + take_text] = self.ds.tokens[base:base + take_text]
                filled += take_text
                pos += take_text
            if filled < length:  # reached the document's end: its <eod>
                out[filled] = self.eod
                filled += 1
                pos += 1
            doc += 1
        return out[:filled]

    def num_windows(self, window: int) -> int:
        return self.length // window


def cached_array(path: Path, build: Callable[[], np.ndarray], timeout_s: float = 600.0) -> np.ndarray:
    """Load ``path`` (memory-mapped), building it first if missing; safe with many processes.

    One process wins an exclusive lock file and builds; it writes to a temporary name and renames,
    so a reader never sees a partial file. The others wait for the file. A builder that died leaves
    its lock behind: after ``timeout_s`` the lock is taken over.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.monotonic() > deadline:
                lock.unlink(missing_ok=True)  # stale: its builder is gone
                deadline = time.monotonic() + timeout_s
            time.sleep(0.05)
            continue
        try:
            if not path.exists():
                tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, build())
                os.replace(tmp, path)
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


class GLMTrainData:
    """The training mixture: ``sample(i)`` for any i >= 0 (epochs wrap), deterministic in (seed, i).

    ``sources`` holds ("lm", IndexedDataset) for documents (cut into windows for blank infilling) or
    ("mip", MIPDataset) for prompted samples (one sample per slot).
    """

    def __init__(self, sources: Sequence[tuple[str, Any]], ids: SpecialIds, seq_length: int, seed: int,
                 objective: ObjectiveConfig, weights: Sequence[float] | None = None,
                 two_d: bool = False, cache_dir: str | Path | None = None, cache_key: str = "") -> None:
        self.ids, self.seq_length, self.seed, self.objective, self.two_d = ids, seq_length, seed, objective, two_d
        self.window = seq_length - 2
        self.kinds = [kind for kind, _ in sources]
        self.items: list[Any] = [TokenStream(ds, ids.eod) if kind == "lm" else ds for kind, ds in sources]
        self.windows = np.asarray([item.num_windows(self.window) if kind == "lm" else len(item)
                                   for kind, item in zip(self.kinds, self.items)], dtype=np.int64)
        if (self.windows == 0).any():
            bad = [i for i, n in enumerate(self.windows) if n == 0]
            raise ValueError(f"data.sources{bad}: no sample fits (fewer tokens than one sequence of {seq_length})")
        total = int(self.windows.sum())
        if weights is None:
            self.slots = self.windows.copy()
        else:
            w = np.asarray(weights, dtype=np.float64)
            self.slots = np.maximum(np.round(w / w.sum() * total).astype(np.int64), (w > 0).astype(np.int64))
        self.epoch_size = int(self.slots.sum())
        self._epoch = -1
        self._table = np.empty((2, 0), dtype=np.int64)
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            key = json.dumps({"seed": seed, "seq_length": seq_length, "windows": self.windows.tolist(),
                              "slots": self.slots.tolist(), "kinds": self.kinds, "extra": cache_key},
                             sort_keys=True)
            self.cache_dir = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.epoch_size

    def _epoch_table(self, epoch: int) -> np.ndarray:
        """[2, epoch_size]: (source, window) of every sample of ``epoch``; cached on disk if configured."""
        if epoch != self._epoch:
            if self.cache_dir is None:
                self._table = self._compute_epoch(epoch)
            else:
                self._table = cached_array(self.cache_dir / f"epoch_{epoch:06d}.npy",
                                           lambda: self._compute_epoch(epoch))
            self._epoch = epoch
        return self._table

    def _compute_epoch(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(self.epoch_size)
        slot_ds = np.repeat(np.arange(len(self.slots)), self.slots)
        first_slot = np.concatenate([[0], np.cumsum(self.slots)[:-1]])
        src = slot_ds[order]
        # The k-th use of source ds overall walks its own per-cycle shuffled windows.
        k = epoch * self.slots[src] + (order - first_slot[src])
        cycle, within = np.divmod(k, self.windows[src])
        win = np.empty(self.epoch_size, dtype=np.int64)
        for ds in range(len(self.slots)):
            for c in np.unique(cycle[src == ds]):
                sel = (src == ds) & (cycle == c)
                perm = np.random.default_rng([self.seed, ds, int(c), 1]).permutation(int(self.windows[ds]))
                win[sel] = perm[within[sel]]
        return np.stack([src.astype(np.int64), win])

    def _window_of(self, index: int) -> tuple[int, int]:
        epoch, j = divmod(index, self.epoch_size)
        table = self._epoch_table(epoch)
        return int(table[0, j]), int(table[1, j])

    def source_of(self, index: int) -> int:
        """Which source sample ``index`` comes from."""
        return self._window_of(index)[0]

    def sample(self, index: int) -> Sample:
        ds, w = self._window_of(index)
        if self.kinds[ds] == "mip":
            from glm_train.data.mip import build_mip_sample

            prompt, target = self.items[ds][w]
            return build_mip_sample(prompt, target, self.seq_length, self.ids, self.two_d)
        text = self.items[ds].read(w * self.window, self.window)
        rng = np.random.default_rng([self.seed, index, 2])
        return build_sample(text, rng, self.seq_length, self.objective, self.ids, self.two_d)


class ValidationSet:
    """Fixed [gMASK] samples from held-out text: consecutive windows, each split at ``gmask_ratio``.

    The scored targets are the Part-B text tokens; the final <eop> target is excluded because a
    window ends at an arbitrary cut, which the model cannot know.
    """

    def __init__(self, ds: IndexedDataset, ids: SpecialIds, seq_length: int, gmask_ratio: float,
                 max_samples: int, two_d: bool = False) -> None:
        stream = TokenStream(ds, ids.eod)
        window = seq_length - 2
        n = stream.num_windows(window)
        if n == 0:
            raise ValueError(f"validation set {ds.prefix}: fewer tokens than one sequence of {seq_length}")
        starts = np.linspace(0, n - 1, num=min(n, max_samples)).round().astype(np.int64) * window
        self.samples = []
        for s in starts:
            smp = build_gmask_sample(stream.read(int(s), window), gmask_ratio, seq_length, ids, two_d)
            last = int(np.nonzero(smp.loss_mask)[0][-1])
            smp.loss_mask[last] = 0.0  # the <eop> target
            self.samples.append(smp)

    def __len__(self) -> int:
        return len(self.samples)


def collate(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch of tensors."""
    return {
        "input_ids": torch.from_numpy(np.stack([s.input_ids for s in samples])),
        "position_ids": torch.from_numpy(np.stack([s.position_ids for s in samples])),
        "prefix_lengths": torch.tensor([s.prefix_length for s in samples], dtype=torch.long),
        "targets": torch.from_numpy(np.stack([s.targets for s in samples])),
        "loss_mask": torch.from_numpy(np.stack([s.loss_mask for s in samples])),
    }
