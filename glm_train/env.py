"""Process environment set-up that must happen before DeepSpeed is imported.

CPU machines get ``DS_ACCELERATOR=cpu`` and gloo, single-process runs get rendezvous defaults
(DeepSpeed otherwise tries MPI discovery), and the JIT-compiled shm op is switched off so that no
compiler or ninja is ever needed (../shared/DEEPSPEED_CPU_NOTES.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket

# glibc's mallopt parameters (malloc.h), and the largest trim threshold its int argument takes.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_NEVER_TRIM = 2**31 - 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    By default every block over 32 MiB is its own mmap, unmapped when freed, so a training step's
    large tensors (logits, ZeRO's flat buffers) are faulted in afresh, page by page, every step. On
    the AMX machines of these sessions (about 10 us a page fault) that cost a fifth of a toy step:
    benchmarks/throughput.py, bf16, 2085 -> 2580 tokens/s, the plain loops faster too
    (docs/performance.md). Large blocks then come from the heap, which is never trimmed: resident
    memory stays at the run's peak, which a training process reaches every step anyway. Returns
    whether it applied (glibc only; GLM_CPU_MALLOC_KEEP=0 turns it off).
    """
    if os.environ.get("GLM_CPU_MALLOC_KEEP", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def cuda_allocator_defaults() -> None:
    """Expandable segments for PyTorch's CUDA caching allocator, unless the user configured it.

    With fixed-size segments, blocks freed in one phase of a step are split and reused in another,
    and the pool grows beyond what is live: glm-1b on an H200 reserved 7.5-8 GiB more than it ever
    had allocated, at every micro-batch (benchmarks/results/gpu_mfu_h200_compile.json), which on an
    80 GB card is the difference between micro-batch 16 fitting or not. Expandable segments grow one
    mapping per stream instead (torchtitan's launcher sets the same). Read when the allocator first
    initializes, so this runs before anything touches the GPU; no effect on CPU.
    """
    if "PYTORCH_ALLOC_CONF" not in os.environ:  # the newer name, honoured as well
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def setup_environment() -> str:
    """Prepare env vars and threads; returns the torch.distributed backend to use."""
    # MKL may pick code paths by memory alignment, which varies run to run and changes the last bit
    # of a result; strict conditional-numerical-reproducibility mode pins them (no cost measured on
    # the toy model: 118 vs 118 ms/step). Must be set before MKL's first call.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    cuda_allocator_defaults()
    cuda = has_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if "RANK" not in os.environ:  # a plain `python`/console-script start: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import torch

    if cuda:
        # Before any group, RNG or tensor touches the GPU: rank-local state lives on its own device.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not cuda:
        keep_freed_memory()
        # Several ranks on few cores: oversubscription slows everything by an order of magnitude.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        if "OMP_NUM_THREADS" not in os.environ or local > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    import deepspeed.ops

    # Built by init_distributed on CPU only for inference all-reduce; it needs a compiler.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return "nccl" if cuda else "gloo"
