"""Run a test body on several spawned processes joined in one gloo group; failures come back here."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glm_train.parallel.state import set_tensor_parallel_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body: Callable[..., None], args: tuple, errors: Any) -> None:
    code = 0
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        body(rank, *args)
        dist.barrier()
        set_tensor_parallel_group(None)  # the last reference to a group outside torch's own registry
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        code = 1
    # Leave without interpreter finalization, once the report is sent: gloo's worker threads torn
    # down during finalization can abort the process ("terminate called without an active
    # exception", SIGABRT) after every check has passed (once in CI on a loaded machine).
    errors.close()
    errors.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_ranks(body: Callable[..., None], world: int, *args: Any, timeout: float = 180) -> None:
    """``body(rank, *args)`` on ``world`` spawned ranks (a module-level function; spawn, not fork: a
    forked child of a process that already ran OpenMP work can hang); asserts every rank succeeded."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, body, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
