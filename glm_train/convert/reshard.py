"""Resharding: a training checkpoint of any (tp, pp, dp) layout -> a layout-free checkpoint -> any layout.

``to_layout_free`` reads a DeepSpeed pipeline checkpoint offline, in one process: each parameter's
FP32 master weight and Adam moments are put together from the ZeRO-1 partitions of every
data-parallel rank (``param_slice_mappings`` say where each parameter's fragment lies in a rank's flat
buffer); TP shards are merged with the parallel
layers' rules (convert/export.py). The result is one safetensors file of full tensors (``<key>::fp32``,
``::exp_avg``, ``::exp_avg_sq``), the Adam step counts, the trainer's state and the run's config.

``load_layout_free`` puts such a checkpoint into a live engine of any layout: each rank cuts its TP
shard of every tensor it holds and writes it through DeepSpeed's fragment API (ZeRO-1) or straight into
the parameters and the torch optimizer's state (ZeRO-0). Per-rank random states cannot be mapped
across layouts, so the RNG streams restart from (seed, step): with dropout the continuation is a
different but equally valid draw; without it, it continues the original curve.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from glm_train.convert.export import (
    checkpoint_config,
    checkpoint_layout,
    merge_tp,
    refuse_to_replace,
    resolve_checkpoint,
    split_tp,
    staged_dir,
    write_safetensors_streaming,
)
from glm_train.train.layer_map import pipeline_to_model_key

LAYOUT_FREE_FORMAT = "glm_train.layout_free"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
_MP_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def _safe_load(path: Path) -> Any:
    """DeepSpeed's files with only its plain record types allowed (never arbitrary pickled code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def model_key(pipe_name: str, num_layers: int) -> str | None:
    """A pipeline module parameter name ('3.attention.qkv.weight', 'tied_modules.embedding.weight') as
    the plain GLMModel's key."""
    if pipe_name.startswith("tied_modules.embedding."):
        return "embedding." + pipe_name.split(".", 2)[2]
    layer, _, rest = pipe_name.partition(".")
    return pipeline_to_model_key(int(layer), rest, num_layers) if layer.isdigit() else None


def _rank_states(ckpt: Path, mp: int, zero_files: dict[int, Path], model_file: dict[str, Any]
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """{pipeline name: {state: this mp rank's (TP-sharded) tensor}} and the Adam step per group."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    steps: list[float] = []
    shapes = model_file["param_shapes"]
    parts = [_safe_load(zero_files[d])["optimizer_state_dict"] for d in sorted(zero_files)]
    for g, group_shapes in enumerate(shapes):
        steps.append(float(parts[0]["base_optimizer_state"]["state"][g]["step"]))
        for name, shape in group_shapes.items():
            pieces: dict[str, list[torch.Tensor]] = {s: [] for s in STATES}
            for part in parts:
                frag = part["param_slice_mappings"][g].get(name)
                if frag is None:
                    continue
                flat = {"fp32": part["single_partition_of_fp32_groups"][g],
                        "exp_avg": part["base_optimizer_state"]["state"][g]["exp_avg"],
                        "exp_avg_sq": part["base_optimizer_state"]["state"][g]["exp_avg_sq"]}
                for s in STATES:
                    pieces[s].append(flat[s].narrow(0, frag.start, frag.numel))
            numel = int(torch.Size(shape).numel())
            got = sum(p.numel() for p in pieces["fp32"])
            if got != numel:
                raise ValueError(f"{ckpt}: {name} has {got} of its {numel} values in the ZeRO partitions of "
                                 f"mp_rank_{mp:02d} (a missing data-parallel shard?)")
            out[name] = {s: torch.cat(pieces[s]).view(shape).clone() for s in STATES}
    return out, steps


def _inventory(ckpt: Path) -> tuple[dict[int, Path], dict[int, dict[int, Path]]]:
    mp_files: dict[int, Path] = {}
    zero: dict[int, dict[int, Path]] = {}
    for f in ckpt.iterdir():
        if m := _MP_FILE.search(f.name):
            mp_files[int(m.group(1))] = f
        elif m := _ZERO_FILE.search(f.name):
            zero.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if not mp_files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_XX_model_states.pt")
    if sorted(mp_files) != list(range(len(mp_files))):
        raise FileNotFoundError(f"{ckpt}: mp_rank files {sorted(mp_files)} are not 0..{len(mp_files) - 1}")
    if zero:
        dps = {len(v) for v in zero.values()}
        if sorted(zero) != sorted(mp_files) or len(dps) != 1 or any(sorted(v) != list(range(len(v)))
                                                                     for v in zero.values()):
            raise FileNotFoundError(f"{ckpt}: incomplete ZeRO optimizer shards (a missing data-parallel rank?)")
    return mp_files, zero


def iter_layout_free(ckpt: Path, num_layers: int) -> tuple[dict[str, Any], Iterator[tuple[str, torch.Tensor]]]:
    """(facts: tp, pp, dp, steps, client state; iterator of ('<key>::<state>', full tensor))."""
    tp, _ = checkpoint_layout(ckpt, num_layers)
    mp_files, zero = _inventory(ckpt)
    if not zero:
        raise ValueError(f"{ckpt} was saved without ZeRO (parallel.zero_stage=0), whose pipeline checkpoints do "
                         "not record which optimizer state belongs to which parameter; resharding reads ZeRO-1 "
                         "checkpoints (the default)")
    if len(mp_files) % tp:
        raise ValueError(f"{ckpt}: {len(mp_files)} mp_rank files for tp={tp}")
    pp = len(mp_files) // tp
    first = _safe_load(mp_files[0])
    client = {k: first[k] for k in ("train_state", "data_fingerprint", "guard") if k in first}
    facts: dict[str, Any] = {"tp": tp, "pp": pp, "dp": len(next(iter(zero.values()))) if zero else None,
                             "zero_stage": 1, "client_state": client, "adam_step": None}

    def gen() -> Iterator[tuple[str, torch.Tensor]]:
        done: set[str] = set()
        for stage in range(pp):
            per_tp = []
            for t in range(tp):
                mp = stage * tp + t  # the grid's model-parallel rank: pipe-major, then TP
                states, steps = _rank_states(ckpt, mp, zero.get(mp, {}), _safe_load(mp_files[mp]))
                per_tp.append(states)
                facts["adam_step"] = facts["adam_step"] or steps
            for name in per_tp[0]:
                key = model_key(name, num_layers)
                if key is None or key in done:  # the tied head's copy on the last stage
                    continue
                done.add(key)
                for s in STATES:
                    yield f"{key}::{s}", merge_tp(key, [st[name][s] for st in per_tp])
            del per_tp

    return facts, gen()


def to_layout_free(src: str | Path, out_dir: str | Path) -> Path:
    """Write the layout-free form of a run dir's latest checkpoint or of a step folder (atomically)."""
    run_dir, ckpt = resolve_checkpoint(src)
    cfg = checkpoint_config(run_dir)
    facts, tensors = iter_layout_free(ckpt, cfg.model.layers)
    out = Path(out_dir)
    refuse_to_replace(out, is_layout_free, "a layout-free checkpoint")
    with staged_dir(out) as tmp:
        write_safetensors_streaming(tmp / "states.safetensors", tensors, {"format": LAYOUT_FREE_FORMAT})
        shutil.copyfile(run_dir / "config.yaml", tmp / "config.yaml")
        meta = {"format": LAYOUT_FREE_FORMAT, "version": 1, "source": str(ckpt),
                "source_layout": {k: facts[k] for k in ("tp", "pp", "dp", "zero_stage")},
                "adam_step": facts["adam_step"], "client_state": facts["client_state"]}
        (tmp / "layout_free.json").write_text(json.dumps(meta, indent=1, default=_jsonable) + "\n")
    return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def is_layout_free(path: str | Path) -> bool:
    return (Path(path) / "layout_free.json").is_file()


def load_layout_free(engine: Any, path: str | Path, num_layers: int, tp_rank: int, tp_size: int) -> dict[str, Any]:
    """Fill ``engine``'s weights and Adam state from a layout-free checkpoint; returns its client state."""
    from safetensors import safe_open

    meta = json.loads((Path(path) / "layout_free.json").read_text())
    if meta.get("format") != LAYOUT_FREE_FORMAT:
        raise ValueError(f"{path}: not a layout-free checkpoint")
    opt = engine.optimizer
    zero = hasattr(opt, "single_partition_of_fp32_groups")
    base = opt.optimizer if zero else opt
    steps = meta["adam_step"]
    if zero:
        # ZeRO-1 creates Adam's state at the first step; create it now so the fragments can be linked.
        for g, flat in enumerate(opt.single_partition_of_fp32_groups):
            base.state[flat] = {"step": torch.tensor(float(steps[g])), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
        opt._lazy_init_hp_params_optimizer_state()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    group_of = {id(p): g for g, group in enumerate(base.param_groups) for p in group["params"]}
    with safe_open(str(Path(path) / "states.safetensors"), framework="pt") as f:
        for name, p in engine.module.named_parameters():
            key = model_key(name, num_layers)
            if key is None:
                continue
            shard = {s: split_tp(key, f.get_tensor(f"{key}::{s}"), tp_rank, tp_size) for s in STATES}
            if tuple(shard["fp32"].shape) != tuple(p.shape):
                raise ValueError(f"{path}: {key} has shard shape {tuple(shard['fp32'].shape)}, this layout's "
                                 f"parameter is {tuple(p.shape)} (another model config?)")
            with torch.no_grad():
                p.copy_(shard["fp32"].to(p.dtype))
            if zero:
                safe_set_full_fp32_param(p, shard["fp32"])
                safe_set_full_optimizer_state(p, shard["exp_avg"], "exp_avg")
                safe_set_full_optimizer_state(p, shard["exp_avg_sq"], "exp_avg_sq")
            else:
                base.state[p] = {"step": torch.tensor(float(steps[group_of[id(p)]])),
                                 "exp_avg": shard["exp_avg"].clone(), "exp_avg_sq": shard["exp_avg_sq"].clone()}
    return meta["client_state"]


def load_export_weights(engine: Any, path: str | Path, num_layers: int, tp_rank: int, tp_size: int) -> None:
    """Initialize ``engine``'s weights (and FP32 masters) from an export; the optimizer starts fresh.

    How a released model (e.g. GLM-130B imported with glm-import-sat) continues training here."""
    from safetensors import safe_open

    zero = hasattr(engine.optimizer, "single_partition_of_fp32_groups")
    from deepspeed.utils import safe_set_full_fp32_param

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, p in engine.module.named_parameters():
            key = model_key(name, num_layers)
            if key is None:
                continue
            if key not in keys:
                raise ValueError(f"{path}: the export lacks {key}")
            shard = split_tp(key, f.get_tensor(key), tp_rank, tp_size).float()
            if tuple(shard.shape) != tuple(p.shape):
                raise ValueError(f"{path}: {key} has shard shape {tuple(shard.shape)}, this layout's parameter "
                                 f"is {tuple(p.shape)} (another model config?)")
            with torch.no_grad():
                p.copy_(shard.to(p.dtype))
            if zero:
                safe_set_full_fp32_param(p, shard)
