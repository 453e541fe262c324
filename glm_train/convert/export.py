"""Layout-free reading of checkpoints and the consolidated export format.

A training checkpoint holds one ``layer_XX-model_YY-model_states.pt`` file per pipeline layer and TP
rank (train/pipeline.py numbers the layers: 0 embedding, 1..N blocks, N+1 final LayerNorm; the tied
head has no tensors of its own). Pipeline stages only decide which process wrote which file, so any
(tp, pp) checkpoint reads the same way; TP shards are merged with the rules of the parallel layers
(parallel/layers.py). Files are memory-mapped and read one layer at a time.

The export is a folder: ``model.safetensors`` (the plain GLMModel's state-dict keys, full tensors),
``config.json`` (format, model config, dtype, provenance) and ``tokenizer.model``. It is written to a
temporary folder, tensor by tensor, and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from glm_train.config import ModelConfig, from_yaml
from glm_train.parallel.layers import _shard_rows
from glm_train.train.checkpoint import CheckpointManager
from glm_train.train.layer_map import pipeline_to_model_key

EXPORT_FORMAT = "glm_train.export"
EXPORT_VERSION = 1
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")

# ------------------------------------------------------------------ TP layout of the plain model's keys


def tp_rule(key: str) -> tuple[str, int]:
    """How ``key`` is split over TP ranks: ("rows", blocks), ("cols", 1) or ("replicated", 1).

    Mirrors parallel/layers.py: the vocabulary-parallel embedding and column-parallel layers split
    rows (the fused QKV in 3 blocks and the GeGLU [gate; up] in 2, each block split separately);
    row-parallel weights split columns; their biases, LayerNorms and the rest are replicated.
    """
    if key == "embedding.weight":
        return "rows", 1
    if key.endswith(("attention.qkv.weight", "attention.qkv.bias")):
        return "rows", 3
    if key.endswith(("mlp.dense_in.weight", "mlp.dense_in.bias")):
        return "rows", 2
    if key.endswith(("attention.dense.weight", "mlp.dense_out.weight")):
        return "cols", 1
    return "replicated", 1


def merge_tp(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its TP shards (rank order)."""
    kind, blocks = tp_rule(key)
    if len(shards) == 1 or kind == "replicated":
        return shards[0]
    if kind == "cols":
        return torch.cat(shards, dim=1)
    per_rank = [s.chunk(blocks, dim=0) for s in shards]
    return torch.cat([torch.cat([p[b] for p in per_rank], dim=0) for b in range(blocks)], dim=0)


def split_tp(key: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This TP rank's shard of ``full`` (the inverse of :func:`merge_tp`)."""
    kind, blocks = tp_rule(key)
    if world == 1 or kind == "replicated":
        return full
    if kind == "cols":
        return full.chunk(world, dim=1)[rank]
    return _shard_rows(full, blocks, rank, world)


# ------------------------------------------------------------------ reading checkpoints of any layout


def _load(path: Path) -> dict[str, torch.Tensor]:
    """A tensor file, memory-mapped, never unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise RuntimeError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run dir, step folder) for a run dir (its latest checkpoint) or a step folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = CheckpointManager(p / "checkpoints", engine=None).latest()
        if latest is None:
            raise FileNotFoundError(f"{p}: run dir has no complete checkpoint (checkpoints/latest missing)")
        return p, latest
    if p.is_dir() and any(LAYER_FILE.search(f.name) for f in p.iterdir()):
        return p.parent.parent, p
    raise FileNotFoundError(f"{p}: not an export, a run dir with checkpoints/, or a checkpoint folder")


def checkpoint_config(run_dir: Path) -> Any:
    """The run's GLMConfig (config.yaml beside checkpoints/, vocabulary resolved)."""
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing; cannot tell the model's shape")
    cfg = from_yaml(cfg_file)
    if cfg.model.vocab_size is None:
        raise ValueError(f"{cfg_file}: model.vocab_size is not resolved")
    return cfg


def checkpoint_layout(ckpt: Path, num_layers: int) -> tuple[int, dict[int, list[Path]]]:
    """(tp size, {pipeline layer: [file per TP rank]}); raises on a missing or extra shard."""
    files: dict[int, dict[int, Path]] = {}
    for f in ckpt.iterdir():
        m = LAYER_FILE.search(f.name)
        if m:
            files.setdefault(int(m.group(1)), {})[int(m.group(2))] = f
    if not files:
        raise FileNotFoundError(f"{ckpt}: no layer files")
    tp = max(len(v) for v in files.values())
    for layer in range(num_layers + 2):
        have = files.get(layer, {})
        if sorted(have) != list(range(tp)):
            missing = [f"layer_{layer:02d}-model_{r:02d}-model_states.pt" for r in range(tp) if r not in have]
            raise FileNotFoundError(f"{ckpt}: missing shard(s) {', '.join(missing)} (checkpoint incomplete)")
    return tp, {layer: [files[layer][r] for r in range(tp)] for layer in sorted(files)}


def iter_checkpoint_tensors(ckpt: Path, model_cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors of the plain model, one pipeline layer's files at a time."""
    tp, layers = checkpoint_layout(ckpt, model_cfg.layers)
    for layer, paths in layers.items():
        shards = [_load(p) for p in paths]
        for name in shards[0]:
            key = pipeline_to_model_key(layer, name, model_cfg.layers)
            if key is None:
                continue
            if any(name not in s for s in shards):
                raise ValueError(f"{ckpt}: {name} of layer {layer} is missing from some TP shards")
            yield key, merge_tp(key, [s[name] for s in shards])
        del shards


def is_export(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()


def read_export_config(path: str | Path) -> dict[str, Any]:
    meta = json.loads((Path(path) / "config.json").read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}/config.json: not a glm_train export (format {meta.get('format')!r})")
    return meta


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    from omegaconf import OmegaConf

    base = OmegaConf.structured(ModelConfig)
    obj = OmegaConf.to_object(OmegaConf.merge(base, d))
    assert isinstance(obj, ModelConfig)
    return obj


def load_export_tensors(path: str | Path) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(model config, full tensors one at a time) from an export, a run dir or a checkpoint folder."""
    if is_export(path):
        from safetensors import safe_open

        meta = read_export_config(path)
        if meta.get("quantization"):
            raise ValueError(f"{path} is a quantized export ({meta['quantization']}); this reads float "
                             "checkpoints and exports only (glm_train.load_model loads quantized ones)")
        cfg = model_config_from_dict(meta["model"])

        def gen() -> Iterator[tuple[str, torch.Tensor]]:
            with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield key, f.get_tensor(key)

        return cfg, gen()
    run_dir, ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(run_dir)
    return cfg.model, iter_checkpoint_tensors(ckpt, cfg.model)


def source_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer that belongs to an export or a run, if it can be found."""
    if is_export(path):
        tok = read_export_config(path).get("tokenizer")
        return Path(path) / tok if tok else None
    run_dir, _ = resolve_checkpoint(path)
    tok = Path(checkpoint_config(run_dir).data.tokenizer)
    return tok if tok.is_file() else None


# ------------------------------------------------------------------ writing an export

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int8: "I8",
              torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}


def write_safetensors_streaming(path: Path, tensors: Iterable[tuple[str, torch.Tensor]],
                                metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written one tensor at a time: data to a side file in arrival order, then the
    header and the data copied behind it. Memory: one tensor."""
    data_path = path.with_name(path.name + ".data")
    header: dict[str, Any] = {}
    offset = 0
    with open(data_path, "wb") as data:
        for key, t in tensors:
            if key in header:
                raise ValueError(f"duplicate tensor {key}")
            t = t.detach().contiguous().cpu()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + len(raw)]}
            data.write(raw)
            offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out, open(data_path, "rb") as data:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        shutil.copyfileobj(data, out, length=16 << 20)
        out.flush()
        os.fsync(out.fileno())
    data_path.unlink()


@contextlib.contextmanager
def staged_dir(out: Path, unique: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` whole, on any error it
    is removed and ``out`` is untouched: a folder that looks complete always is. ``unique`` puts the
    process id in the temporary name, so two writers never share it."""
    tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}" if unique else f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_export(out_dir: str | Path, model_cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], *,
                 tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
                 meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write an export folder atomically; ``dtype`` casts floating tensors (None keeps theirs).

    ``extra``: more top-level config.json entries (e.g. ``quantization``), also recorded as JSON strings
    in the safetensors metadata."""
    out = Path(out_dir)
    refuse_to_replace(out, is_export, "a glm_train export")
    seen_dtypes: set[str] = set()

    def cast() -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in tensors:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            seen_dtypes.add(str(t.dtype).replace("torch.", ""))
            yield key, t

    extra = extra or {}
    with staged_dir(out) as tmp:
        write_safetensors_streaming(tmp / "model.safetensors", cast(),
                                    {"format": EXPORT_FORMAT, **{k: json.dumps(v) for k, v in extra.items()}})
        tok_name = None
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
            tok_name = "tokenizer.model"
        config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                  "model": _plain(dataclasses.asdict(model_cfg)), "dtype": sorted(seen_dtypes),
                  "tokenizer": tok_name, "meta": meta or {}, **extra}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def refuse_to_replace(out: Path, same_kind: Any, what: str) -> None:
    """An output folder is only ever replaced by one of its own kind: never delete a user's other data."""
    if out.exists() and not (out.is_dir() and (same_kind(out) or not any(out.iterdir()))):
        raise ValueError(f"{out} exists and is not {what} (nor empty): refusing to replace it")


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in d.items()}
