"""``<run.dir>/manifest.json``: what produced a run, and every start, resume and rollback of it."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "deepspeed", "numpy", "sentencepiece", "hydra-core", "omegaconf", "safetensors")


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the source tree glm_train runs from (None outside a git checkout)."""
    repo = repo or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def update_manifest(run_dir: Path, *, config: dict[str, Any], layout: dict[str, Any],
                    data_fingerprint: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the manifest with the current facts and ``event`` appended to its history (atomic)."""
    path = run_dir / "manifest.json"
    history: list[dict[str, Any]] = []
    if path.is_file():
        try:
            history = json.loads(path.read_text()).get("history", [])
        except (json.JSONDecodeError, OSError):
            history = []  # a damaged manifest must not stop training; its history restarts here
    git = git_state()
    history.append({"time": now(), "host": socket.gethostname(), "pid": os.getpid(),
                    "git_commit": git["commit"], **event})
    manifest = {"config": config, "git": git, "packages": package_versions(), "layout": layout,
                "data_fingerprint": data_fingerprint, "command": sys.argv, "history": history}
    tmp = path.with_name(f"manifest.json.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return manifest
