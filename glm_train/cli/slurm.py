"""glm-slurm: start a multi-node run inside a SLURM allocation, from SLURM's environment variables.

Two modes:

* ``--mode srun`` (one SLURM task per GPU): each task sets RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT and execs ``python -m glm_train.cli.train``.
* ``--mode deepspeed`` (one SLURM task per node): each node runs DeepSpeed's launcher with
  ``--no_ssh --node_rank R``, which starts that node's GPUs itself; no ssh, no pdsh.

``--dry-run`` prints every node's command(s) and exits; nothing here talks to other hosts, calls
``scontrol`` or imports torch.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODES = ("srun", "deepspeed")
TRAIN_MODULE = "glm_train.cli.train"
DS_MODULE = "glm_train.train"  # its __main__ strips the --local_rank=N the DeepSpeed launcher appends


class SlurmError(ValueError):
    """The SLURM environment or the flags cannot describe a run; the message says which variable."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _expand_brackets(body: str, host: str) -> list[str]:
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise SlurmError(f"bad range '{part}' in hostlist entry '{host}'")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise SlurmError(f"descending range '{part}' in hostlist entry '{host}'")
        # SLURM pads to the width of the lower bound: gpu[07-10] -> gpu07 ... gpu10.
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def _expand_host(host: str) -> list[str]:
    """One comma-free entry, possibly with several bracket groups: ``r[1-2]n[01-02]`` -> 4 names."""
    m = re.search(r"\[([^\[\]]*)\]", host)
    if m is None:
        if "[" in host or "]" in host:
            raise SlurmError(f"unbalanced brackets in hostlist entry '{host}'")
        return [host]
    prefix, suffix = host[: m.start()], host[m.end():]
    if "[" in prefix or "]" in prefix:
        raise SlurmError(f"unbalanced brackets in hostlist entry '{host}'")
    return [prefix + n + rest for n in _expand_brackets(m.group(1), host) for rest in _expand_host(suffix)]


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist (``gpu[001-003,007],login1``) into host names, in order."""
    entries: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(hostlist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmError(f"unbalanced brackets in hostlist '{hostlist}'")
        elif ch == "," and depth == 0:  # commas inside brackets separate ranges, not hosts
            entries.append(hostlist[start:i])
            start = i + 1
    if depth != 0:
        raise SlurmError(f"unbalanced brackets in hostlist '{hostlist}'")
    entries.append(hostlist[start:])
    hosts = [h for e in entries if e.strip() for h in _expand_host(e.strip())]
    if not hosts:
        raise SlurmError(f"empty hostlist '{hostlist}'")
    return hosts


def default_master_port(job_id: str) -> int:
    """A port in [15000, 30000) derived from the job id: equal on every node, different across jobs.

    The range stays below Linux's ephemeral ports (32768+), so no outgoing connection holds it.
    """
    n = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 15000 + n % 15000


@dataclass(frozen=True)
class SlurmJob:
    """What every node must agree on to form one process group."""

    hosts: list[str]
    gpus_per_node: int
    master_port: int
    job_id: str

    @property
    def nnodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    def rank_env(self, node_id: int, local_rank: int) -> dict[str, str]:
        """torch.distributed's rendezvous variables of one rank."""
        return {
            "RANK": str(node_id * self.gpus_per_node + local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(self.gpus_per_node),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            # SLURM_GPUS_ON_NODE can read "8" or, on some sites, "gpu:8" / "a100:8".
            value = env[name].rsplit(":", 1)[-1]
            if not value.isdigit():
                raise SlurmError(f"{name}={env[name]!r} is not a non-negative integer")
            return int(value)
    return None


def job_from_env(env: Mapping[str, str], gpus_per_node: int | None = None,
                 master_port: int | None = None) -> SlurmJob:
    """Read the allocation from SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_GPUS_ON_NODE, SLURM_JOB_ID."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError("SLURM_JOB_NODELIST is not set (run inside an sbatch/salloc allocation)")
    hosts = expand_hostlist(nodelist)
    nnodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    if nnodes is not None and nnodes != len(hosts):
        raise SlurmError(f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST={nodelist!r} names {len(hosts)} hosts")
    gpus = gpus_per_node if gpus_per_node is not None else _int_env(env, "SLURM_GPUS_ON_NODE")
    if gpus is None or gpus < 1:
        raise SlurmError("GPUs per node unknown: SLURM_GPUS_ON_NODE is unset or 0 "
                         "(request GPUs with --gpus-per-node, or pass --gpus-per-node G to glm-slurm)")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    if master_port is None:
        if not job_id:
            raise SlurmError("SLURM_JOB_ID is not set; pass --master-port")
        master_port = default_master_port(job_id)
    if not 1 <= master_port <= 65535:
        raise SlurmError(f"master port must lie in [1, 65535], got {master_port}")
    return SlurmJob(hosts=hosts, gpus_per_node=gpus, master_port=master_port, job_id=job_id)


def srun_command(job: SlurmJob, node_id: int, local_rank: int, overrides: list[str],
                 python: str) -> tuple[dict[str, str], list[str]]:
    """(env, argv) of one rank started by srun."""
    return job.rank_env(node_id, local_rank), [python, "-u", "-m", TRAIN_MODULE, *overrides]


def deepspeed_command(job: SlurmJob, node_id: int, overrides: list[str], hostfile: str,
                      deepspeed: str) -> list[str]:
    """argv of DeepSpeed's launcher on one node.

    Without a hostfile the launcher knows only localhost and refuses ``--num_nodes`` > 1, so one is
    passed; ``--no_ssh`` keeps it from checking ssh or using pdsh, and ``--master_addr`` from asking
    the first host for its address over ssh.
    """
    return [deepspeed, "--hostfile", hostfile, "--num_nodes", str(job.nnodes), "--num_gpus",
            str(job.gpus_per_node), "--node_rank", str(node_id), "--master_addr", job.master_addr,
            "--master_port", str(job.master_port), "--no_ssh", "--module", DS_MODULE, *overrides]


def hostfile_text(job: SlurmJob) -> str:
    """DeepSpeed hostfile: ``host slots=G`` per node, in node-rank order."""
    return "".join(f"{h} slots={job.gpus_per_node}\n" for h in job.hosts)


def _shell(env: Mapping[str, str], argv: list[str]) -> str:
    return " ".join([f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.join(argv)])


def render_dry_run(job: SlurmJob, mode: str, overrides: list[str], python: str, hostfile: str,
                   deepspeed: str) -> str:
    """Every node's command(s) as shell text, one block per node."""
    blocks = []
    for node_id, host in enumerate(job.hosts):
        first = node_id * job.gpus_per_node
        lines = [f"# node {node_id}: {host} (ranks {first}-{first + job.gpus_per_node - 1} "
                 f"of {job.world_size}, MASTER_ADDR={job.master_addr}, MASTER_PORT={job.master_port})"]
        if mode == "srun":
            for local_rank in range(job.gpus_per_node):
                lines.append(_shell(*srun_command(job, node_id, local_rank, overrides, python)))
        else:
            lines.append(f"cat > {shlex.quote(hostfile)} <<'EOF'\n{hostfile_text(job)}EOF")
            lines.append(shlex.join(deepspeed_command(job, node_id, overrides, hostfile, deepspeed)))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _default_deepspeed() -> str:
    # The launcher re-execs its own interpreter for every rank, so take the one next to this
    # Python (the project's venv) before whatever is first on PATH.
    sibling = Path(sys.executable).with_name("deepspeed")
    return str(sibling) if sibling.is_file() else "deepspeed"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glm-slurm",
        description="Start glm-train on every node of a SLURM allocation (see launch/slurm/README.md).",
        epilog="Training overrides follow '--', e.g. glm-slurm --mode srun -- --config-name=glm-130b-3d "
               "run.dir=runs/x")
    p.add_argument("--mode", choices=MODES, default="srun",
                   help="srun: one SLURM task per GPU; deepspeed: one task per node running DeepSpeed's launcher")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: $SLURM_GPUS_ON_NODE")
    p.add_argument("--master-port", type=int, default=None, help="default: derived from $SLURM_JOB_ID")
    p.add_argument("--hostfile", default=None,
                   help="deepspeed mode: where each node writes the launcher's hostfile "
                        "(default: $TMPDIR/glm-slurm-<job id>.hostfile, node-local)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the ranks (srun mode)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed launcher executable (deepspeed mode)")
    p.add_argument("--dry-run", action="store_true", help="print every node's command(s) and exit")
    return p


def _this_node(env: Mapping[str, str], job: SlurmJob) -> int:
    node_id = _int_env(env, "SLURM_NODEID")
    if node_id is None:
        raise SlurmError("SLURM_NODEID is not set (start glm-slurm with srun inside the allocation)")
    if node_id >= job.nnodes:
        raise SlurmError(f"SLURM_NODEID={node_id} but the job has {job.nnodes} nodes")
    return node_id


def run(argv: list[str], env: Mapping[str, str] | None = None) -> int:
    """Parse ``argv``, then print (``--dry-run``) or exec this task's command; returns an exit code."""
    env = os.environ if env is None else env
    if "--" in argv:
        cut = argv.index("--")
        args, overrides = _parser().parse_args(argv[:cut]), argv[cut + 1:]
    else:
        # Overrides may also follow the options directly, as long as none looks like a flag of ours.
        args, overrides = _parser().parse_known_args(argv)
    job = job_from_env(env, args.gpus_per_node, args.master_port)
    hostfile = args.hostfile or os.path.join(env.get("TMPDIR") or "/tmp",
                                             f"glm-slurm-{job.job_id or 'job'}.hostfile")
    deepspeed = args.deepspeed or _default_deepspeed()
    if args.dry_run:
        sys.stdout.write(render_dry_run(job, args.mode, overrides, args.python, hostfile, deepspeed))
        return 0
    node_id = _this_node(env, job)
    local_id = _int_env(env, "SLURM_LOCALID") or 0
    if args.mode == "srun":
        if local_id >= job.gpus_per_node:
            raise SlurmError(f"SLURM_LOCALID={local_id} but there are {job.gpus_per_node} GPUs per node: "
                             "start exactly one task per GPU (srun --ntasks-per-node=G)")
        rank_env, cmd = srun_command(job, node_id, local_id, overrides, args.python)
    else:
        if local_id != 0:
            raise SlurmError(f"SLURM_LOCALID={local_id}: deepspeed mode needs one task per node "
                             "(srun --ntasks-per-node=1); the launcher starts the GPUs' ranks itself")
        # Written whole then renamed: on a shared filesystem every node writes the same file.
        path = Path(hostfile)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(hostfile_text(job))
        os.replace(tmp, path)
        rank_env, cmd = {}, deepspeed_command(job, node_id, overrides, hostfile, deepspeed)
    print(f"glm-slurm: node {node_id} ({job.hosts[node_id]}): {_shell(rank_env, cmd)}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, {**env, **rank_env})
    return 0  # not reached


def main() -> None:
    """Console entry: a SLURM or flag error becomes one line on stderr and exit 2."""
    try:
        sys.exit(run(sys.argv[1:]))
    except SlurmError as e:
        print(f"glm-slurm: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
