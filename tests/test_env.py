"""Process set-up (glm_train/env.py) that changes measurable behaviour."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Ten "steps" that allocate, write and free large tensors as a training step does; prints whether
# keep_freed_memory applied and the minor page faults of each step.
_PROBE = """
import json, resource, torch
from glm_train.env import keep_freed_memory
applied = keep_freed_memory()
def step():
    a = torch.ones(16 * 2**20)  # 64 MiB, every page written
    b = torch.ones(32 * 2**20)
    s = a.sum() + b.sum()
    del a
    c = torch.ones(8 * 2**20)
    del b, c
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([applied, faults]))
"""


def _faults(keep: str) -> tuple[bool, list[int]]:
    env = {**os.environ, "GLM_CPU_MALLOC_KEEP": keep, "OMP_NUM_THREADS": "1"}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = json.loads(out.stdout)
    return applied, faults


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    """glibc's default unmaps every block over 32 MiB when freed, so each step faults 224 MiB in again
    (57 thousand pages); with keep_freed_memory the heap reaches the step's high-water mark within a
    few steps and then faults nothing."""
    applied, kept = _faults("1")
    off, default = _faults("0")
    assert applied and not off
    assert min(default) > 40_000, default
    assert sum(kept[-3:]) < 0.05 * sum(default[-3:]), kept
