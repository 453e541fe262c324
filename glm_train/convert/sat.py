"""SwissArmyTransformer (SAT) GLM checkpoints, the format of GLM-130B's released weights, to and from
the plain GLMModel's state dict (docs/sat.md).

A SAT checkpoint is one ``mp_rank_XX_model_states.pt`` per tensor-parallel rank, each a torch pickle of
``{"module": state_dict}``. Layout differences with ours (full, tp=1 tensors):

* ``attention.query_key_value`` [3H, H] groups its rows per head (q_h | k_h | v_h, 3*head_dim rows per
  head); ours holds [Q; K; V] blocks of H rows, heads contiguous inside each block. SAT's TP ranks hold
  whole heads, so its shards are joined by plain concatenation.
* ``mlp.dense_h_to_4h`` [2I, H] is [x1; x2] with output ``x1 * gelu(x2)``; ours is [gate; up] with
  output ``gelu(gate) * up``, so ours = [x2; x1]. SAT splits each half over ranks separately (rank r
  holds [x1_r; x2_r]).
* Row-parallel weights (``attention.dense``, ``mlp.dense_4h_to_h``) are split along dim 1, their biases
  and the LayerNorms replicated; the word embedding (tied output head) is split by vocabulary rows.
* ``attention.rotary_emb.inv_freq`` buffers (GLM-130B's rotary tables) are checked against the model
  config and dropped on import, written on export.

Shards are memory-mapped (``torch.load(..., weights_only=True, mmap=True)``): only the tensors touched
are paged in, and the reader yields one layer at a time, so the converted tensors held at once are one
layer's (plus the embedding while it is yielded). Nothing is ever unpickled with code execution.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from glm_train.config import CONFIG_DIR, ModelConfig, PositionEncoding
from glm_train.convert.export import staged_dir

SHARD_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")

EMBEDDING = "transformer.word_embeddings.weight"
FINAL_LN = ("transformer.final_layernorm.weight", "transformer.final_layernorm.bias")
INV_FREQ = "attention.rotary_emb.inv_freq"

# SAT per-layer parameter -> (our per-layer name, how SAT splits it over TP ranks), in SAT module order.
#   replicated: every rank holds the whole tensor   cols: split along dim 1 (row-parallel weights)
#   heads: rows split by whole heads (per-head q|k|v grouping kept)   glu: [x1_r; x2_r] per rank
LAYER_PARAMS: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicated"),
    "input_layernorm.bias": ("input_layernorm.bias", "replicated"),
    "attention.query_key_value.weight": ("attention.qkv.weight", "heads"),
    "attention.query_key_value.bias": ("attention.qkv.bias", "heads"),
    "attention.dense.weight": ("attention.dense.weight", "cols"),
    "attention.dense.bias": ("attention.dense.bias", "replicated"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.weight", "replicated"),
    "post_attention_layernorm.bias": ("post_attention_layernorm.bias", "replicated"),
    "mlp.dense_h_to_4h.weight": ("mlp.dense_in.weight", "glu"),
    "mlp.dense_h_to_4h.bias": ("mlp.dense_in.bias", "glu"),
    "mlp.dense_4h_to_h.weight": ("mlp.dense_out.weight", "cols"),
    "mlp.dense_4h_to_h.bias": ("mlp.dense_out.bias", "replicated"),
}
_SHAPE_FIELDS = ("layers", "hidden", "ffn_hidden", "vocab_size")

TensorSource = (Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
                | Callable[[], Iterable[tuple[str, torch.Tensor]]])


class SatFormatError(ValueError):
    """A SAT checkpoint (or a conversion request) is malformed; the message names the file or key."""


# ------------------------------------------------------------------ model config


def glm130b_model_config(overrides: Mapping[str, Any] | None = None, where: str = "--model-config") -> ModelConfig:
    """ModelConfig defaults overlaid with configs/model/glm-130b.yaml, then with ``overrides``
    (a model yaml's keys); unknown keys or wrong types raise SatFormatError naming ``where``."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    preset = CONFIG_DIR / "model" / "glm-130b.yaml"
    if not preset.is_file():
        raise FileNotFoundError(f"{preset}: missing; it gives the GLM-130B defaults of the SAT import")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(preset))
    except OmegaConfBaseException as e:
        raise SatFormatError(f"{preset}: {str(e).splitlines()[0]}") from None
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(dict(overrides)))
        except OmegaConfBaseException as e:
            raise SatFormatError(f"{where}: {str(e).splitlines()[0]}") from None
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    return cfg


def load_model_yaml(path: str | Path) -> dict[str, Any]:
    """The keys of a model yaml (configs/model/*.yaml style; a top-level ``model:`` section also works)."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: model config not found")
    data = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
    if isinstance(data, dict) and set(data) == {"model"} and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise SatFormatError(f"{p}: expected a mapping of ModelConfig keys")
    allowed = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise SatFormatError(f"{p}: unknown model key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return {str(k): v for k, v in data.items()}


def rotary_dim(cfg: ModelConfig) -> int:
    head_dim = cfg.hidden // cfg.heads
    return head_dim // 2 if PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d else head_dim


def rotary_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """GLM-130B's ``inv_freq`` buffer: 1 / base^(2i/dim) over the rotary dim (FP32)."""
    dim = rotary_dim(cfg)
    return 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2).float() / dim))


def sat_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Model options a SAT checkpoint cannot carry that differ from GLM-130B's: SAT must be run with them."""
    ref = glm130b_model_config()
    notes = []
    for name in ("deepnorm", "position_encoding", "rope_base", "layernorm_eps"):
        ours, theirs = getattr(cfg, name), getattr(ref, name)
        ours = getattr(ours, "value", ours)
        theirs = getattr(theirs, "value", theirs)
        if ours != theirs:
            notes.append(f"model.{name}={ours} (GLM-130B: {theirs}) is not stored in SAT checkpoints")
    return notes


# ------------------------------------------------------------------ reading


def _tensor_file_is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_shard(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """(the ``module`` state dict, the ``mp_world_size`` it records if any) of one shard file;
    memory-mapped, never unpickling code."""
    # mmap needs torch's zip format (torch >= 1.6); the legacy format is read whole.
    mmap = _tensor_file_is_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or unsafe file
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            reason = (f"it holds Python objects besides tensors{what}, which are never unpickled here; "
                      "re-save it as {'module': state_dict} with tensors only")
        elif mmap:
            first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
            reason = f"truncated or damaged ({type(e).__name__}: {first.split('. ')[0][:300]})"
        else:
            reason = f"not a torch checkpoint, or truncated or damaged ({type(e).__name__}: {text[:200]})"
        raise RuntimeError(f"cannot read SAT shard {path}: {reason}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
        keys = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise SatFormatError(f"{path}: not a SAT shard (no 'module' state dict; has {keys})")
    world = obj.get("mp_world_size")
    return obj["module"], world if isinstance(world, int) else None


def resolve_sat_dir(input_dir: str | Path) -> tuple[Path, list[Path], str | None]:
    """(folder of the shards, shard files in rank order, iteration named by ``latest`` or None).

    ``input_dir`` is either the folder holding ``mp_rank_XX_model_states.pt`` or its parent with a
    ``latest`` file naming the subfolder (SAT's save layout).
    """
    d = Path(input_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such folder")
    iteration = None
    found = {int(m.group(1)): f for f in d.iterdir() if (m := SHARD_FILE.match(f.name))}
    if not found and (d / "latest").is_file():
        iteration = (d / "latest").read_text().strip()
        sub = d / iteration
        if not iteration or not sub.is_dir():
            raise FileNotFoundError(f"{d / 'latest'} names {iteration!r}, which is not a folder in {d}")
        d = sub
        found = {int(m.group(1)): f for f in d.iterdir() if (m := SHARD_FILE.match(f.name))}
    if not found:
        raise FileNotFoundError(f"{d}: no mp_rank_XX_model_states.pt files (nor a 'latest' file naming a "
                                "subfolder that holds them)")
    n = max(found) + 1
    missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(n) if r not in found]
    if missing:
        raise FileNotFoundError(f"{d}: missing shard(s) {', '.join(missing)} of a {n}-way tensor-parallel "
                                f"checkpoint (found {', '.join(found[r].name for r in sorted(found))})")
    return d, [found[r] for r in range(n)], iteration


def _merge(kind: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full SAT tensor from its TP shards (rank order)."""
    if len(parts) == 1 or kind == "replicated":
        return parts[0]
    if kind == "cols":
        return torch.cat(parts, dim=1)
    if kind == "glu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0)  # heads, vocab rows


def _split(kind: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s SAT shard of a full SAT tensor (inverse of :func:`_merge`), as its own storage."""
    if world == 1 or kind == "replicated":
        part = full
    elif kind == "cols":
        part = full.chunk(world, dim=1)[rank]
    elif kind == "glu":
        x1, x2 = full.chunk(2, dim=0)
        part = torch.cat([x1.chunk(world, dim=0)[rank], x2.chunk(world, dim=0)[rank]], dim=0)
    else:
        part = full.chunk(world, dim=0)[rank]
    # A view would make torch.save write the whole storage.
    return part.clone(memory_format=torch.contiguous_format)


def sat_qkv_to_ours(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head [q_h; k_h; v_h] rows -> [Q; K; V] blocks (weight [3H, H] or bias [3H])."""
    head_dim = t.shape[0] // (3 * heads)
    return t.unflatten(0, (heads, 3, head_dim)).transpose(0, 1).reshape(t.shape)


def ours_qkv_to_sat(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[Q; K; V] blocks -> per-head [q_h; k_h; v_h] rows."""
    head_dim = t.shape[0] // (3 * heads)
    return t.unflatten(0, (3, heads, head_dim)).transpose(0, 1).reshape(t.shape)


def sat_glu_to_ours(t: torch.Tensor) -> torch.Tensor:
    """[x1; x2] (x1 * gelu(x2)) -> [gate; up] (gelu(gate) * up) = [x2; x1]."""
    x1, x2 = t.chunk(2, dim=0)
    return torch.cat([x2, x1], dim=0)


def ours_glu_to_sat(t: torch.Tensor) -> torch.Tensor:
    gate, up = t.chunk(2, dim=0)
    return torch.cat([up, gate], dim=0)


def _classify(key: str) -> tuple[int | None, str] | None:
    """(layer or None, name) for a known SAT key, None for an unknown one."""
    if key == EMBEDDING or key in FINAL_LN:
        return None, key
    m = _LAYER_KEY.match(key)
    if m and (m.group(2) in LAYER_PARAMS or m.group(2) == INV_FREQ):
        return int(m.group(1)), m.group(2)
    return None


def _check_keys(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> tuple[int, bool]:
    """(number of layers, whether rotary inv_freq buffers are present); raises on unknown/missing keys."""
    for f, sd in zip(files, shards):
        keys = list(sd)
        odd = [k for k in keys if not isinstance(sd[k], torch.Tensor)]
        if odd:
            raise SatFormatError(f"{f}: 'module' entries that are not tensors: {', '.join(map(str, odd[:5]))}")
        quant = [k for k in keys if k.endswith("_scale")] + [k for k in keys if sd[k].dtype in (torch.int8, torch.uint8)]
        if quant:
            raise SatFormatError(f"{f}: quantized (INT8/INT4) SAT checkpoints are not supported "
                                 f"({sorted(set(quant))[:3]}); convert the FP16 release instead")
        unknown = [k for k in keys if _classify(k) is None]
        if unknown:
            raise SatFormatError(f"{f}: unknown key(s) {', '.join(sorted(unknown)[:5])}"
                                 f"{' ...' if len(unknown) > 5 else ''} (not a GLM-130B SAT checkpoint?)")
        for k in keys:
            if not sd[k].is_floating_point():
                raise SatFormatError(f"{f}: {k} has dtype {sd[k].dtype}; expected floating-point weights")
    layers = {c[0] for sd in shards for k in sd if (c := _classify(k)) is not None and c[0] is not None}
    num_layers = max(layers) + 1 if layers else 0
    if num_layers == 0:
        raise SatFormatError(f"{files[0]}: no transformer.layers.* tensors")
    has_inv_freq = any(k.endswith(INV_FREQ) for sd in shards for k in sd)
    expected = {EMBEDDING, *FINAL_LN}
    for i in range(num_layers):
        expected.update(f"transformer.layers.{i}.{n}" for n in LAYER_PARAMS)
        if has_inv_freq:
            expected.add(f"transformer.layers.{i}.{INV_FREQ}")
    for f, sd in zip(files, shards):
        missing = sorted(expected - set(sd), key=_natural)
        if missing:
            raise SatFormatError(f"{f}: missing key(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return num_layers, has_inv_freq


def _natural(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _check_shapes(files: list[Path], shards: list[dict[str, torch.Tensor]], num_layers: int,
                  heads: int) -> tuple[int, int, int]:
    """(hidden, ffn size, vocab) from the shard shapes; raises on any inconsistency."""
    tp = len(shards)
    for key in shards[0]:
        shapes = [tuple(sd[key].shape) for sd in shards]
        dtypes = {sd[key].dtype for sd in shards}
        if len(set(shapes)) > 1:
            detail = ", ".join(f"{f.name}: {list(s)}" for f, s in zip(files, shapes))
            raise SatFormatError(f"inconsistent shapes between shards for {key}: {detail}")
        if len(dtypes) > 1:
            raise SatFormatError(f"inconsistent dtypes between shards for {key}: {sorted(map(str, dtypes))}")
    emb = shards[0][EMBEDDING]
    if emb.dim() != 2:
        raise SatFormatError(f"{files[0]}: {EMBEDDING} has shape {list(emb.shape)}; expected [vocab/tp, hidden]")
    vocab, hidden = emb.shape[0] * tp, emb.shape[1]
    w_out = shards[0]["transformer.layers.0.mlp.dense_4h_to_h.weight"]
    if w_out.dim() != 2:
        raise SatFormatError(f"{files[0]}: transformer.layers.0.mlp.dense_4h_to_h.weight has shape "
                             f"{list(w_out.shape)}; expected [hidden, ffn/tp]")
    ffn = w_out.shape[1] * tp
    if hidden % heads:
        raise SatFormatError(f"--num-attention-heads {heads} does not divide the hidden size {hidden} of the "
                             "checkpoint (GLM-130B: 96)")
    if heads % tp:
        raise SatFormatError(f"--num-attention-heads {heads} is not divisible by the checkpoint's {tp} "
                             "tensor-parallel shards (SAT gives each rank whole heads)")
    if (hidden // heads) % 2:
        raise SatFormatError(f"head dim {hidden}/{heads} = {hidden // heads} is odd; RoPE needs an even one "
                             "(wrong --num-attention-heads?)")
    want = {
        "input_layernorm.weight": (hidden,), "input_layernorm.bias": (hidden,),
        "attention.query_key_value.weight": (3 * hidden // tp, hidden),
        "attention.query_key_value.bias": (3 * hidden // tp,),
        "attention.dense.weight": (hidden, hidden // tp), "attention.dense.bias": (hidden,),
        "post_attention_layernorm.weight": (hidden,), "post_attention_layernorm.bias": (hidden,),
        "mlp.dense_h_to_4h.weight": (2 * ffn // tp, hidden), "mlp.dense_h_to_4h.bias": (2 * ffn // tp,),
        "mlp.dense_4h_to_h.weight": (hidden, ffn // tp), "mlp.dense_4h_to_h.bias": (hidden,),
    }
    for key in FINAL_LN:
        if tuple(shards[0][key].shape) != (hidden,):
            raise SatFormatError(f"{files[0]}: {key} has shape {list(shards[0][key].shape)}, expected [{hidden}]")
    for i in range(num_layers):
        for name, shape in want.items():
            key = f"transformer.layers.{i}.{name}"
            got = tuple(shards[0][key].shape)
            if got != shape:
                raise SatFormatError(f"{files[0]}: {key} has shape {list(got)}, expected {list(shape)} "
                                     f"(hidden {hidden}, ffn {ffn}, {tp} shards)")
    return hidden, ffn, vocab


def _check_inv_freq(files: list[Path], shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> None:
    want = rotary_inv_freq(cfg)
    for f, sd in zip(files, shards):
        for i in range(cfg.layers):
            key = f"transformer.layers.{i}.{INV_FREQ}"
            got = sd[key].float()
            if got.shape != want.shape:
                implied = ""
                if got.dim() == 1 and got.numel():
                    per_head = 2 * got.numel() * (2 if cfg.position_encoding == PositionEncoding.rope_2d else 1)
                    if cfg.hidden % per_head == 0:
                        implied = f"; its rotary table implies {cfg.hidden // per_head} heads"
                raise SatFormatError(f"{f}: {key} has {got.numel()} entries, {cfg.heads} heads of "
                                     f"{cfg.hidden // cfg.heads} ({cfg.position_encoding.value}) need {want.numel()}"
                                     f"{implied} (check --num-attention-heads)")
            if not torch.allclose(got, want, rtol=5e-3, atol=0.0):
                raise SatFormatError(f"{f}: {key} does not match RoPE base {cfg.rope_base} "
                                     f"(set rope_base with --model-config)")


def read_sat(input_dir: str | Path, num_heads: int = 96, *,
             model_overrides: Mapping[str, Any] | None = None,
             ) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(model config, our plain GLMModel keys with full tensors, one layer at a time).

    Shapes give layers, hidden, ffn size and vocabulary; ``num_heads`` the heads; the options a SAT
    checkpoint does not carry come from configs/model/glm-130b.yaml overlaid with ``model_overrides``
    (a model yaml's keys; shape keys there must agree with the checkpoint). Every file, key and shape is
    checked before this returns, so a broken checkpoint fails before anything is written.
    """
    overrides = dict(model_overrides or {})
    if "heads" in overrides and int(overrides["heads"]) != num_heads:
        raise SatFormatError(f"--model-config sets heads={overrides['heads']} but --num-attention-heads is {num_heads}")
    if num_heads < 1:
        raise SatFormatError(f"--num-attention-heads must be >= 1, got {num_heads}")
    folder, files, iteration = resolve_sat_dir(input_dir)
    shards = []
    for f in files:
        sd, world = load_shard(f)
        if world is not None and world != len(files):
            raise FileNotFoundError(f"{f}: written by a {world}-way tensor-parallel run but {folder} holds "
                                    f"{len(files)} shard(s) (missing shards?)")
        shards.append(sd)
    num_layers, has_inv_freq = _check_keys(files, shards)
    hidden, ffn, vocab = _check_shapes(files, shards, num_layers, num_heads)
    shape = {"layers": num_layers, "hidden": hidden, "ffn_hidden": ffn, "vocab_size": vocab}
    for name in _SHAPE_FIELDS:
        if overrides.get(name) is not None and int(overrides[name]) != shape[name]:
            raise SatFormatError(f"--model-config sets {name}={overrides[name]} but the checkpoint has {shape[name]}")
    base = glm130b_model_config(overrides)
    preset = glm130b_model_config()
    if "name" not in overrides and (num_layers, hidden, num_heads) != (preset.layers, preset.hidden, preset.heads):
        overrides["name"] = "sat-import"
    cfg = replace(base, heads=num_heads, name=overrides.get("name", base.name), **shape)
    if PositionEncoding(cfg.position_encoding) == PositionEncoding.rope_2d and (hidden // num_heads) % 4:
        raise SatFormatError(f"rope_2d needs a head dim divisible by 4, got {hidden // num_heads}")
    if has_inv_freq:
        _check_inv_freq(files, shards, cfg)
    _warn_replicas(files, shards, num_layers)
    return cfg, _iter_tensors(shards, cfg)


def _warn_replicas(files: list[Path], shards: list[dict[str, torch.Tensor]], num_layers: int) -> None:
    """Replicated tensors (LayerNorms, row-parallel biases) should be equal on every rank; rank 0's are used."""
    if len(shards) == 1:
        return
    keys = list(FINAL_LN) + [f"transformer.layers.{i}.{n}" for i in range(num_layers)
                             for n, (_, kind) in LAYER_PARAMS.items() if kind == "replicated"]
    for key in keys:
        ref = shards[0][key]
        for f, sd in zip(files[1:], shards[1:]):
            if not torch.equal(sd[key], ref):
                diff = (sd[key].float() - ref.float()).abs().max().item()
                warnings.warn(f"{f}: replicated tensor {key} differs from rank 0's by up to {diff:.3g}; "
                              "using rank 0's", stacklevel=3)


def _iter_tensors(shards: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    yield "embedding.weight", _merge("rows", [sd[EMBEDDING] for sd in shards])
    for i in range(cfg.layers):
        for name, (ours, kind) in LAYER_PARAMS.items():
            full = _merge(kind, [sd[f"transformer.layers.{i}.{name}"] for sd in shards])
            if kind == "heads":
                full = sat_qkv_to_ours(full, cfg.heads)
            elif kind == "glu":
                full = sat_glu_to_ours(full)
            yield f"layers.{i}.{ours}", full
            del full
    for key in FINAL_LN:
        yield key.removeprefix("transformer."), shards[0][key]


# ------------------------------------------------------------------ writing


def _our_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg.hidden, cfg.ffn_size(), cfg.vocab_size
    per_layer = {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
                 "attention.qkv.weight": (3 * h, h), "attention.qkv.bias": (3 * h,),
                 "attention.dense.weight": (h, h), "attention.dense.bias": (h,),
                 "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
                 "mlp.dense_in.weight": (2 * f, h), "mlp.dense_in.bias": (2 * f,),
                 "mlp.dense_out.weight": (h, f), "mlp.dense_out.bias": (h,)}
    out: dict[str, tuple[int, ...]] = {"embedding.weight": (v, h)}  # type: ignore[dict-item]
    for i in range(cfg.layers):
        out.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    out["final_layernorm.weight"] = (h,)
    out["final_layernorm.bias"] = (h,)
    return out


def check_sat_tp(cfg: ModelConfig, tp: int) -> None:
    """Refuse TP sizes SAT's layout cannot express for this model."""
    if tp < 1:
        raise SatFormatError(f"--tp must be >= 1, got {tp}")
    if cfg.vocab_size is None:
        raise SatFormatError("model.vocab_size is not resolved")
    for what, n in (("heads", cfg.heads), ("FFN size", cfg.ffn_size()), ("vocabulary rows", cfg.vocab_size)):
        if n % tp:
            raise SatFormatError(f"--tp {tp} does not divide the model's {what} ({n})")


def _sat_shard(key: str, t: torch.Tensor, cfg: ModelConfig, rank: int, tp: int) -> tuple[str, torch.Tensor]:
    """(SAT key, rank's SAT shard) of one of our full tensors."""
    if key == "embedding.weight":
        return EMBEDDING, _split("rows", t, rank, tp)
    if key.startswith("final_layernorm."):
        return "transformer." + key, _split("replicated", t, rank, tp)
    _, i, name = key.split(".", 2)
    sat_name, kind = _OUR_TO_SAT[name]
    if kind == "heads":
        t = ours_qkv_to_sat(t, cfg.heads)
    elif kind == "glu":
        t = ours_glu_to_sat(t)
    return f"transformer.layers.{i}.{sat_name}", _split(kind, t, rank, tp)


_OUR_TO_SAT = {ours: (sat, kind) for sat, (ours, kind) in LAYER_PARAMS.items()}


def _sat_order(cfg: ModelConfig) -> list[str]:
    """SAT's module order of the keys (what its model's state_dict() lists)."""
    keys = [EMBEDDING]
    for i in range(cfg.layers):
        names = list(LAYER_PARAMS)
        names.insert(names.index("attention.dense.weight"), INV_FREQ)
        keys += [f"transformer.layers.{i}.{n}" for n in names]
    return keys + list(FINAL_LN)


def write_sat(model_cfg: ModelConfig, tensors: TensorSource, tp: int, output_dir: str | Path) -> Path:
    """Write ``output_dir/mp_rank_XX_model_states.pt`` (``{"module": state_dict}``) for ``tp`` ranks.

    The files go straight into ``output_dir`` (the release layout; SAT's loader wants them in
    ``<ckpt>/<iteration>/`` beside ``<ckpt>/latest``, see docs/sat.md). ``tensors`` is our full-tensor
    state dict: a Mapping (read once per rank), a callable returning a fresh iterable (called once per
    rank) or a plain iterable (read once; all ranks are then held in memory until written). With the
    first two, memory holds one rank's shards plus one full tensor. The folder is written under
    ``<output_dir>.tmp`` and renamed into place when complete.
    """
    check_sat_tp(model_cfg, tp)
    out = Path(output_dir)
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a folder")
        other = [f.name for f in out.iterdir() if not SHARD_FILE.match(f.name)]
        if other:
            raise FileExistsError(f"{out}: exists and holds other files ({', '.join(sorted(other)[:3])}); "
                                  "refusing to replace it")
    shapes = _our_shapes(model_cfg)
    inv_freq = rotary_inv_freq(model_cfg)

    def checked(source: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        seen: set[str] = set()
        for key, t in source:
            if key not in shapes:
                raise SatFormatError(f"unexpected tensor {key} for a model of {model_cfg.layers} layers")
            if tuple(t.shape) != shapes[key]:
                raise SatFormatError(f"{key} has shape {list(t.shape)}, the model config expects {list(shapes[key])}")
            if key in seen:
                raise SatFormatError(f"duplicate tensor {key}")
            if not t.is_floating_point():
                raise SatFormatError(f"{key} has dtype {t.dtype}; expected floating point")
            seen.add(key)
            yield key, t
        missing = sorted(set(shapes) - seen, key=_natural)
        if missing:
            raise SatFormatError(f"the input lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")

    def finish(rank: int, sd: dict[str, torch.Tensor]) -> None:
        for i in range(model_cfg.layers):
            ref = sd[f"transformer.layers.{i}.attention.query_key_value.weight"]
            sd[f"transformer.layers.{i}.{INV_FREQ}"] = inv_freq.to(ref.dtype)
        ordered = {k: sd[k] for k in _sat_order(model_cfg)}
        torch.save({"module": ordered}, tmp / f"mp_rank_{rank:02d}_model_states.pt")

    with staged_dir(out, unique=False) as tmp:
        if isinstance(tensors, Mapping):
            for rank in range(tp):
                finish(rank, dict(_sat_shard(k, t, model_cfg, rank, tp) for k, t in checked(tensors.items())))
        elif callable(tensors):
            for rank in range(tp):
                finish(rank, dict(_sat_shard(k, t, model_cfg, rank, tp) for k, t in checked(tensors())))
        else:
            ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for key, t in checked(tensors):
                for rank in range(tp):
                    k, part = _sat_shard(key, t, model_cfg, rank, tp)
                    ranks[rank][k] = part
                del t
            for rank in range(tp):
                finish(rank, ranks[rank])
                ranks[rank] = {}
    return out


def describe(cfg: ModelConfig) -> str:
    """One line: the model's shape and weight count."""
    h, f = cfg.hidden, cfg.ffn_size()
    params = (cfg.vocab_size or 0) * h + cfg.layers * (4 * h * h + 3 * h * f + 2 * f + 9 * h) + 2 * h
    return f"{cfg.layers} layers, hidden {h}, {cfg.heads} heads, ffn {f}, vocab {cfg.vocab_size}, {params:,} weights"
