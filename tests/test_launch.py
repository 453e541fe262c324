"""Launchers: local torchrun script, the DeepSpeed-launcher entry, SLURM command rendering, presets."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from glm_train.cli import slurm
from glm_train.cli.slurm import SlurmError, expand_hostlist
from tests.conftest import REPO, data_overrides

SLURM_ENV = {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_GPUS_ON_NODE": "8"}
OVERRIDES = ["--config-name=glm-130b-3d", "run.dir=runs/x y"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(extra)
    return env


def _blocks(text: str) -> list[list[str]]:
    return [b.splitlines() for b in text.strip().split("\n\n")]


# --- (b) hostlist expansion ------------------------------------------------------------------------

@pytest.mark.parametrize("hostlist,hosts", [
    ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("single", ["single"]),
    ("a,b[1,3],c", ["a", "b1", "b3", "c"]),
    ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
    ("dgx-[1-2]-ib", ["dgx-1-ib", "dgx-2-ib"]),
])
def test_expand_hostlist(hostlist: str, hosts: list[str]) -> None:
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["gpu[1-", "gpu1-2]", "gpu[3-1]", "gpu[a-b]", "", "gpu[]"])
def test_expand_hostlist_refuses_malformed(bad: str) -> None:
    with pytest.raises(SlurmError):
        expand_hostlist(bad)


# --- (a) SLURM dry-run rendering --------------------------------------------------------------------

def test_slurm_dry_run_srun(capsys: pytest.CaptureFixture[str]) -> None:
    assert slurm.run(["--mode", "srun", "--dry-run", "--", *OVERRIDES], env=SLURM_ENV) == 0
    blocks = _blocks(capsys.readouterr().out)
    assert len(blocks) == 2
    port = slurm.default_master_port("4242")
    ranks = []
    for node, block in enumerate(blocks):
        assert block[0].startswith(f"# node {node}: gpu0{7 + node} ")
        lines = block[1:]
        assert len(lines) == 8
        for local, line in enumerate(lines):
            words = shlex.split(line)
            env = dict(w.split("=", 1) for w in words[:6])
            assert env == {"RANK": str(node * 8 + local), "WORLD_SIZE": "16", "LOCAL_RANK": str(local),
                           "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu07", "MASTER_PORT": str(port)}
            assert words[7:] == ["-u", "-m", "glm_train.cli.train", *OVERRIDES]  # quoting survives
            ranks.append(int(env["RANK"]))
    assert ranks == list(range(16))


def test_slurm_dry_run_deepspeed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--mode", "deepspeed", "--dry-run", "--deepspeed", "deepspeed", "--hostfile", "/tmp/h", "--",
            *OVERRIDES]
    assert slurm.run(argv, env=SLURM_ENV) == 0
    blocks = _blocks(capsys.readouterr().out)
    assert len(blocks) == 2
    port = slurm.default_master_port("4242")
    for node, block in enumerate(blocks):
        text = "\n".join(block)
        assert "gpu07 slots=8\ngpu08 slots=8\n" in text  # the hostfile each node writes
        words = shlex.split(block[-1])
        assert words == ["deepspeed", "--hostfile", "/tmp/h", "--num_nodes", "2", "--num_gpus", "8",
                         "--node_rank", str(node), "--master_addr", "gpu07", "--master_port", str(port),
                         "--no_ssh", "--module", "glm_train.train", *OVERRIDES]


def test_slurm_deepspeed_flags_exist_in_installed_launcher() -> None:
    """Every flag we render is one DeepSpeed's runner parses (catches renames across versions)."""
    from deepspeed.launcher.runner import parse_args

    job = slurm.job_from_env(SLURM_ENV)
    cmd = slurm.deepspeed_command(job, 1, ["model=tiny"], "/tmp/h", "deepspeed")
    args = parse_args(cmd[1:])
    assert (args.num_nodes, args.num_gpus, args.node_rank, args.master_addr, args.master_port) == (
        2, 8, 1, "gpu07", job.master_port)
    assert args.no_ssh and args.module and args.hostfile == "/tmp/h"
    assert args.user_script == "glm_train.train" and args.user_args == ["model=tiny"]


def test_slurm_master_port_and_gpus_flag(capsys: pytest.CaptureFixture[str]) -> None:
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_ON_NODE"}
    with pytest.raises(SlurmError, match="GPUs per node"):
        slurm.run(["--dry-run"], env=env)
    assert slurm.run(["--gpus-per-node", "4", "--master-port", "29555", "--dry-run", "x=1"], env=env) == 0
    blocks = _blocks(capsys.readouterr().out)
    assert [len(b) - 1 for b in blocks] == [4, 4]
    assert blocks[1][-1].startswith("RANK=7 WORLD_SIZE=8 LOCAL_RANK=3 LOCAL_WORLD_SIZE=4 MASTER_ADDR=gpu07 "
                                    "MASTER_PORT=29555 ")
    assert blocks[1][-1].endswith(" x=1")
    assert slurm.default_master_port("4242") == slurm.default_master_port("4242")
    assert slurm.default_master_port("4242") != slurm.default_master_port("4243")
    assert all(15000 <= slurm.default_master_port(str(j)) < 30000 for j in (0, 1, 14999, 15000, 10**9))
    with pytest.raises(SlurmError, match="SLURM_NNODES"):
        slurm.job_from_env({**SLURM_ENV, "SLURM_NNODES": "3"})


def test_slurm_console_script_dry_run() -> None:
    """The installed entry point works with only SLURM's variables (and exits 2 outside SLURM)."""
    exe = Path(sys.executable).with_name("glm-slurm")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "glm_train.cli.slurm"]
    out = subprocess.run([*cmd, "--mode", "deepspeed", "--dry-run", "--", "model=tiny"],
                         env=_env(**SLURM_ENV), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("--no_ssh") == 2 and "--node_rank 1 " in out.stdout
    bad = subprocess.run([*cmd, "--dry-run"], env=_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "SLURM_JOB_NODELIST" in bad.stderr


# --- (c) the DeepSpeed launcher's --local_rank is stripped -------------------------------------------

@pytest.mark.parametrize("flag", [["--local_rank=0"], ["--local_rank", "0"], ["--local-rank=1"]])
def test_train_module_strips_local_rank(flag: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "glm_train.train", *flag, "model=tiny", "train.bogus_key=3"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "config error" in out.stderr and "train.bogus_key" in out.stderr
    assert "local_rank" not in out.stderr.replace("-", "_").split("config error", 1)[1]


def test_strip_local_rank() -> None:
    from glm_train.train.__main__ import strip_local_rank

    assert strip_local_rank(["--local_rank=3", "a=1", "--config-name=x"]) == (["a=1", "--config-name=x"], "3")
    assert strip_local_rank(["a=1", "--local-rank", "2", "b=2"]) == (["a=1", "b=2"], "2")
    assert strip_local_rank(["a=1"]) == (["a=1"], None)


# --- (e) local.sh usage -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["two"], ["0"], ["-3"]])
def test_local_sh_usage(args: list[str]) -> None:
    out = subprocess.run(["bash", str(REPO / "launch/local.sh"), *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert "usage:" in out.stderr and "NPROC" in out.stderr


# --- presets compose and validate ---------------------------------------------------------------------

def _compose(name: str, overrides: list[str]):  # -> GLMConfig
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from glm_train import config as C

    C._register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(C.CONFIG_DIR), version_base=None):
        cfg = compose(config_name=name, overrides=overrides)
    C._check_unknown_keys(OmegaConf.to_container(cfg, resolve=True), C.GLMConfig, "")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, C.GLMConfig)
    return obj


@pytest.mark.parametrize("preset,layers,hidden,heads,ffn", [("glm-1b", 24, 2048, 32, 5504),
                                                            ("glm-10b", 48, 4096, 64, 10944)])
def test_model_presets(monkeypatch: pytest.MonkeyPatch, preset: str, layers: int, hidden: int, heads: int,
                       ffn: int) -> None:
    from glm_train.config import validate

    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = _compose("config", [f"model={preset}"])
    m = cfg.model
    assert (m.layers, m.hidden, m.heads, m.seq_length, m.ffn_size()) == (layers, hidden, heads, 2048, ffn)
    assert m.pad_vocab_multiple >= 128 and m.pad_vocab_multiple % 128 == 0
    validate(cfg, check_paths=False)


def test_glm_130b_3d_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from glm_train.config import Precision, validate

    cfg = _compose("glm-130b-3d", [])
    p, t, m = cfg.parallel, cfg.train, cfg.model
    assert (p.tp, p.pp, p.zero_stage, p.activation_checkpoint_interval, p.partition) == (4, 8, 1, 1, "glm")
    assert (t.micro_batch, t.global_batch, t.lr, t.min_lr) == (1, 4224, 8e-5, 8e-6)
    assert (m.layers, m.hidden, m.heads) == (70, 12288, 96)
    assert cfg.precision == Precision.fp16 and cfg.run.dir == "runs/glm-130b"
    assert (cfg.fp16.initial_scale_power, cfg.fp16.loss_scale_window, cfg.fp16.hysteresis,
            cfg.fp16.min_loss_scale) == (16, 2000, 2, 1.0)
    # SPEC: ramp-up 192 -> 4224 in steps of 24 over ~2.5% of the samples; LR warm-up over 0.5%.
    from glm_train.train.schedules import global_batch_at, total_samples

    total = total_samples(t)
    assert abs(total - 400e9 / 2048) / total < 1e-4
    assert (t.rampup.start, t.rampup.increment) == (192, 24) and abs(t.rampup.samples / total - 0.025) < 1e-3
    assert abs(t.warmup_samples / total - 0.005) < 1e-3 and t.warmup_init_lr == 1e-7
    assert global_batch_at(0, t) == 192 and global_batch_at(t.rampup.samples, t) == 4224
    world = 96 * 8
    dp = world // (p.tp * p.pp)
    assert dp == 24 and t.global_batch // (t.micro_batch * dp) == 176  # micro-batches per pipeline
    # Every other rule with the same data-parallel size, whatever the state of the tp/pp refusal.
    monkeypatch.setenv("WORLD_SIZE", str(dp))
    flat = _compose("glm-130b-3d", ["parallel.tp=1", "parallel.pp=1"])
    validate(flat, check_paths=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    validate(cfg, check_paths=False)


# --- (d) two data-parallel ranks through torchrun -----------------------------------------------------

def _train_overrides(tiny_data: dict[str, str], run_dir: Path) -> list[str]:
    return ["model=tiny", *data_overrides(tiny_data), "train.iters=4", "train.micro_batch=2",
            "train.global_batch=4", "eval.every=0", "checkpoint.every=0", "train.progress=false",
            f"run.dir={run_dir}"]


def _steps(run_dir: Path) -> list[int]:
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["step"] for r in lines if "loss" in r]


@pytest.mark.slow
def test_local_sh_data_parallel(tiny_data: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = _env(PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run(["bash", str(REPO / "launch/local.sh"), "2", *_train_overrides(tiny_data, run_dir)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4]


@pytest.mark.slow
def test_slurm_deepspeed_mode_two_fake_nodes(tiny_data: dict[str, str], tmp_path: Path) -> None:
    """Two "nodes" on this machine (localhost and 127.0.0.1, one rank each) through glm-slurm's
    deepspeed mode: the real DeepSpeed launcher with a hostfile and --no_ssh, no ssh or pdsh."""
    run_dir = tmp_path / "run"
    base = _env(SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_NNODES="2", SLURM_JOB_ID="31337",
                SLURM_LOCALID="0", TMPDIR=str(tmp_path), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        base.pop(k, None)
    cmd = [sys.executable, "-m", "glm_train.cli.slurm", "--mode", "deepspeed", "--gpus-per-node", "1", "--",
           *_train_overrides(tiny_data, run_dir)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**base, "SLURM_NODEID": str(n)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert all(re.search(r"'--local_rank=0'", log) for log in logs)  # the launcher did pass it
    assert _steps(run_dir) == [1, 2, 3, 4]
