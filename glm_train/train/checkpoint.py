"""Checkpoint folders: ``checkpoints/step_XXXXXXX/`` written under a temporary name, then renamed,
and a ``latest`` file replaced atomically last. A crash during a save leaves the previous
checkpoint and ``latest`` intact; a leftover ``*.tmp`` folder is ignored and cleaned up.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LATEST = "latest"
KILL_IN_SAVE_ENV = "GLM_TRAIN_KILL_IN_SAVE"
"""Crash drill: SIGKILL this process in the middle of saving the step it names (files written to the
temporary folder, nothing renamed yet)."""


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save/load through the DeepSpeed engine with atomic publication and retention."""

    def __init__(self, root: Path, engine: Any, keep_last: int = 0, keep_every: int = 0) -> None:
        self.root, self.engine, self.keep_last, self.keep_every = Path(root), engine, keep_last, keep_every

    def latest(self) -> Path | None:
        f = self.root / LATEST
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        path = self.root / tag
        if not path.is_dir():
            raise FileNotFoundError(f"{f} names {tag}, which does not exist: the checkpoint folder is damaged")
        return path

    def steps(self) -> list[int]:
        """Steps of the complete checkpoint folders, ascending."""
        out = []
        for p in self.root.glob("step_*"):
            if p.is_dir() and p.name[5:].isdigit():
                out.append(int(p.name[5:]))
        return sorted(out)

    def latest_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of a step before ``step``, or None."""
        older = [s for s in self.steps() if s < step]
        return self.root / step_tag(older[-1]) if older else None

    def abandon_after(self, step: int, tag: str) -> list[str]:
        """Move checkpoints newer than ``step`` to ``abandoned/`` (a rollback's discarded branch: kept for
        inspection, out of ``latest`` and retention); returns their names. Rank 0 moves, all wait."""
        moved = [step_tag(s) for s in self.steps() if s > step]
        if dist.get_rank() == 0 and moved:
            dest = self.root / "abandoned"
            dest.mkdir(exist_ok=True)
            for name in moved:
                os.replace(self.root / name, dest / f"{name}-{tag}")
            latest_tmp = self.root / (LATEST + ".tmp")
            latest_tmp.write_text(step_tag(step) + "\n")
            os.replace(latest_tmp, self.root / LATEST)
            _fsync_dir(self.root)
        dist.barrier()
        return moved

    def save(self, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> Path:
        """Save; ``client_state`` is shared by all ranks, ``rank_state`` (RNG streams) is per rank."""
        tag = step_tag(step)
        tmp_tag = tag + ".tmp"
        rank0 = dist.get_rank() == 0
        if rank0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        dist.barrier()
        self.engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        torch.save(rank_state, self.root / tmp_tag / f"rank_state_{dist.get_rank():05d}.pt")
        if os.environ.get(KILL_IN_SAVE_ENV) == str(step):  # crash drill: die with the save half done
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
        final = self.root / tag
        if rank0:
            for f in (self.root / tmp_tag).rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():  # the same step saved again (e.g. resumed at it): replace it whole
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            _fsync_dir(self.root)
            latest_tmp = self.root / (LATEST + ".tmp")
            latest_tmp.write_text(tag + "\n")
            with open(latest_tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(latest_tmp, self.root / LATEST)
            _fsync_dir(self.root)
            self._retain(tag)
        dist.barrier()
        return final

    def _retain(self, newest: str) -> None:
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in self.root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        if self.keep_last > 0:
            for p in steps[:-self.keep_last]:
                milestone = self.keep_every > 0 and int(p.name[5:]) % self.keep_every == 0
                if p.name != newest and not milestone:
                    shutil.rmtree(p, ignore_errors=True)

    def load(self, path: str | None = None) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Load ``path`` (a step folder) or the latest checkpoint.

        Returns (client state, this rank's state), or None when there is nothing to resume from.
        """
        target = Path(path) if path else self.latest()
        if target is None:
            return None
        if not target.is_dir():
            raise FileNotFoundError(f"checkpoint.load={path}: no such checkpoint folder")
        try:
            load_path, client = self.engine.load_checkpoint(str(target.parent), tag=target.name,
                                                            load_optimizer_states=True,
                                                            load_lr_scheduler_states=True)
        except Exception as e:  # noqa: BLE001 - torch/DeepSpeed raise many types for a damaged file
            raise RuntimeError(f"cannot read checkpoint {target}: {type(e).__name__}: {e}") from e
        if load_path is None or client is None:
            raise RuntimeError(f"cannot read checkpoint {target}: DeepSpeed found no model states in it")
        rank_file = target / f"rank_state_{dist.get_rank():05d}.pt"
        if not rank_file.is_file():
            raise RuntimeError(f"cannot resume from {target}: {rank_file.name} is missing (saved with another "
                               "world size? resharding is not supported yet)")
        try:
            return client, torch.load(rank_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"cannot read {rank_file}: {type(e).__name__}: {e}") from e
