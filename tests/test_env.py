"""Process set-up (glm_train/env.py) that changes measurable behaviour."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

# Allocate and free a 256 MiB tensor; glibc's own accounting (mallinfo2) says where it came from:
# bytes in mmapped blocks (hblkhd) and in the heap (arena), during and after.
_PROBE = """
import ctypes, json, torch
from glm_train.env import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
applied = keep_freed_memory()
def info():
    i = libc.mallinfo2()
    return {"mmapped": i.hblkhd, "heap": i.arena}
before = info()
t = torch.ones(64 * 2**20)
during = info()
del t
after = info()
print(json.dumps({"applied": applied, "before": before, "during": during, "after": after}))
"""
MIB = 2**20


def _probe(keep: str) -> dict:
    env = {**os.environ, "GLM_CPU_MALLOC_KEEP": keep, "OMP_NUM_THREADS": "1"}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_large_blocks_come_from_the_heap_and_stay():
    """glibc's default maps a 256 MiB block on its own and unmaps it when freed (so the next step
    faults it in again); with keep_freed_memory it comes from the heap, which keeps it when freed."""
    default, kept = _probe("0"), _probe("1")
    assert not default["applied"] and kept["applied"]
    assert default["during"]["mmapped"] - default["before"]["mmapped"] >= 256 * MIB, default
    assert default["after"]["mmapped"] - default["before"]["mmapped"] < 256 * MIB, default
    assert kept["during"]["mmapped"] == kept["before"]["mmapped"], kept
    assert kept["during"]["heap"] - kept["before"]["heap"] >= 256 * MIB, kept
    assert kept["after"]["heap"] == kept["during"]["heap"], kept  # not trimmed: reused next time


_ALLOC = """
import json, os
from glm_train.env import setup_environment
setup_environment()
print(json.dumps({k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}))
"""


@pytest.mark.parametrize("given,expected", [
    ({}, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTORCH_ALLOC_CONF": None}),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"},
     {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "PYTORCH_ALLOC_CONF": None}),
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:False"},
     {"PYTORCH_CUDA_ALLOC_CONF": None, "PYTORCH_ALLOC_CONF": "expandable_segments:False"}),
], ids=["default", "user_cuda_name", "user_new_name"])
def test_cuda_allocator_gets_expandable_segments_unless_configured(given, expected):
    """The caching allocator reads its settings once, at its first use: setup_environment must set
    them before anything else does, and never over a user's own (either variable name)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    env.update(given, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-c", _ALLOC], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
