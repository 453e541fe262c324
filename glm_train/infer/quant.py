"""Weight-only INT8/INT4 quantization of the four linear layers of every GLM block (SPEC.md,
"Quantization for inference"; docs/quantization.md).

Method: symmetric absmax per output row ("vector-wise", GLM-130B), optionally per group of
``group_size`` input columns of a row (an extension beyond GLM-130B):

    scale = max|W_row(group)| / (2^(b-1) - 1),   q = clamp(round(W / scale), -(2^(b-1)-1), 2^(b-1)-1)

Storage:

- INT8: ``qweight`` int8 [out, in].
- INT4: ``qweight`` uint8 [out, ceil(in/2)], two values per byte: column ``2j`` in the low nibble,
  column ``2j+1`` in the high nibble, each as a 4-bit two's-complement number (-7..7; -8 is never
  written). An odd column count leaves the last high nibble 0.
- ``scale`` [out, in/group_size] (one column when per row), FP16 by default. The FP32 scale is
  rounded *up* to the next FP16 value, so ``|W/scale| <= qmax`` holds for the stored scale and the
  bound ``|W - q*scale| <= scale/2`` is exact for the stored scale (no clamping error). A layer whose
  scales do not fit FP16 (max|W| > 65504*qmax) keeps FP32 scales. Two bytes per row keep INT8 within
  0.51x of BF16 even at 128 columns (the demo model), where FP32 scales would make it 0.516x.
- Biases, embeddings and LayerNorms stay float.

The matmul dequantizes on the fly (``q * scale`` in FP32, cast to the activation dtype, then
``F.linear``): correct on CPU and GPU, not fast. The tensor-parallel communication of the replaced
layer is kept: a column-parallel layer copies its input to the TP region (and gathers its output if
it did), a row-parallel one all-reduces its partial output. Quantizing a TP-sharded model gives the
same integers and scales as quantizing the full model: row-parallel rows are split over ranks, so
their per-row absmax is all-reduced (MAX) over the TP group.

The quantized checkpoint is an export folder (convert/export.py) whose ``config.json`` carries
``"quantization": {"bits", "group_size", "method": "absmax-row", ...}`` and whose
``model.safetensors`` holds ``<layer>.qweight`` / ``<layer>.scale`` / ``<layer>.bias`` for the
quantized layers and the plain float tensors for the rest. :func:`load_quantized` builds the model on
the meta device, swaps in empty :class:`QuantizedLinear` shells and fills tensors one at a time, so
no float copy of the quantized weights ever exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from glm_train.parallel.comm import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from glm_train.parallel.layers import ColumnParallelLinear, RowParallelLinear, _shard_rows
from glm_train.parallel.state import tp_group, tp_rank, tp_world_size

__all__ = [
    "QUANT_METHOD",
    "QUANT_TARGETS",
    "QuantizedLinear",
    "dequantize_tensor",
    "format_report",
    "is_quantized_export",
    "load_quantized",
    "pack_int4",
    "quantize_export",
    "quantize_model",
    "quantize_tensor",
    "save_quantized",
    "unpack_int4",
    "weight_bytes_report",
]

QUANT_METHOD = "absmax-row"
QUANT_TARGETS = ("attention.qkv", "attention.dense", "mlp.dense_in", "mlp.dense_out")
"""The four linear layers of every block (paths under ``layers.<i>``)."""
INT4_PACKING = "low nibble = even column, high nibble = odd column, 4-bit two's complement"
DEFAULT_SCALE_DTYPE = torch.float16
_TARGET_KEY = re.compile(r"^layers\.\d+\.(attention\.qkv|attention\.dense|mlp\.dense_in|mlp\.dense_out)\.weight$")
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SAME_WIDTH_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# ------------------------------------------------------------------ tensor-level quantization


def qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for INT8, 7 for INT4."""
    check_bits(bits)
    return 2 ** (bits - 1) - 1


def check_bits(bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")


def check_group_size(group_size: int | None, in_features: int, what: str = "weight") -> int:
    """The number of scale columns; raises unless ``group_size`` divides ``in_features``."""
    if group_size is None:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group size must be a positive integer, not {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the {in_features} input features of {what}")
    return in_features // group_size


def _round_scale_up(scale32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale32`` (>= 0) in ``dtype``, rounded up so the stored scale is never below the exact one;
    FP32 when ``dtype`` cannot hold it."""
    if dtype == torch.float32:
        return scale32
    s = scale32.to(dtype)
    if not torch.isfinite(s).all():
        return scale32
    low = s.float() < scale32
    if bool(low.any()):  # positive finite floats: the next value up is the bit pattern + 1
        s = torch.where(low, (s.view(torch.int16) + 1).view(dtype), s)
    return s


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int | None = None,
                    scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE,
                    absmax_hook: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in] in [-qmax, qmax], scale [out, in/group_size] in ``scale_dtype``) of a 2D weight.

    ``absmax_hook`` (optional) maps the [out, groups] FP32 absmax before the scales are taken (the
    TP all-reduce of row-parallel layers).
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2D weight, got shape {tuple(w.shape)}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale dtype must be one of {_SCALE_DTYPES}, not {scale_dtype}")
    m = qmax(bits)
    out, n = w.shape
    groups = check_group_size(group_size, n)
    g = w.detach().float().reshape(out, groups, n // groups)
    absmax = g.abs().amax(dim=-1)
    if absmax_hook is not None:
        absmax = absmax_hook(absmax)
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantize a weight with non-finite values")
    scale = _round_scale_up(absmax / m, scale_dtype)
    s32 = scale.float()
    divisor = torch.where(s32 > 0, s32, torch.ones_like(s32))  # an all-zero row stays 0 with scale 0
    q = torch.round(g / divisor.unsqueeze(-1)).clamp_(-m, m).to(torch.int8).reshape(out, n)
    return q, scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` (q int8 [out, in]; scale [out, groups]) computed in FP32, returned in ``dtype``."""
    out, n = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(out, groups, n // groups) * scale.float().unsqueeze(-1)
    return w.reshape(out, n).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], shape [out, in] -> uint8 [out, ceil(in/2)] (see INT4_PACKING)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))  # the odd last column pairs with a zero high nibble
    nib = q.to(torch.int16) & 0xF
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 [out, ceil(in/2)] -> int8 [out, in_features], the inverse of :func:`pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"unpack_int4: {packed.shape[1]} bytes per row cannot hold {in_features} columns")
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, p >> 4
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return ((both ^ 8) - 8).to(torch.int8)  # sign-extend the 4-bit two's complement


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return q if bits == 8 else pack_int4(q)


def unpack(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    return qweight if bits == 8 else unpack_int4(qweight, in_features)


# ------------------------------------------------------------------ the module


class QuantizedLinear(nn.Module):
    """A column- or row-parallel linear layer with packed integer weights, dequantized per call.

    ``in_features``/``out_features`` are this rank's weight shape (equal to the full one at TP=1).
    State: ``qweight`` (int8 or packed uint8 buffer), ``scale`` (float buffer), ``bias`` (float
    parameter, not trained). ``model.to(dtype)`` casts the bias but keeps the scale's own dtype:
    the scale is part of the stored format (see :meth:`_apply`).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None = None,
                 parallel: str = "column", bias: bool = True, gather_output: bool = False,
                 input_is_parallel: bool = True, scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE,
                 name: str = "QuantizedLinear") -> None:
        super().__init__()
        check_bits(bits)
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel must be 'column' or 'row', not {parallel!r}")
        groups = check_group_size(group_size, in_features, name)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.parallel = bits, group_size, parallel
        self.gather_output, self.input_is_parallel = gather_output, input_is_parallel
        cols = in_features if bits == 8 else (in_features + 1) // 2
        self.register_buffer("qweight", torch.empty(out_features, cols,
                                                    dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @classmethod
    def like(cls, layer: nn.Module, bits: int, group_size: int | None = None,
             scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE, name: str = "layer") -> QuantizedLinear:
        """An empty shell with the shape and TP role of a Column/RowParallelLinear (on the current device)."""
        if isinstance(layer, ColumnParallelLinear):
            kw = dict(parallel="column", gather_output=layer.gather_output)
        elif isinstance(layer, RowParallelLinear):
            kw = dict(parallel="row", input_is_parallel=layer.input_is_parallel)
        else:
            raise TypeError(f"{name}: cannot quantize a {type(layer).__name__}")
        out, n = layer.weight.shape
        return cls(n, out, bits=bits, group_size=group_size, bias=layer.bias is not None,
                   scale_dtype=scale_dtype, name=name, **kw)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, layer: nn.Module, bits: int, group_size: int | None = None,
                    scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE, name: str = "layer") -> QuantizedLinear:
        """Quantize a Column/RowParallelLinear (its TP shard); the result lives on the layer's device."""
        w = layer.weight
        with torch.device(w.device):
            ql = cls.like(layer, bits, group_size, scale_dtype, name)
        hook = None
        if ql.parallel == "row" and group_size is None and tp_world_size() > 1:
            hook = _all_reduce_max  # the row is split over ranks: one absmax for the whole row
        q, scale = quantize_tensor(w, bits, group_size, scale_dtype, hook)
        ql.qweight = pack(q, bits)
        ql.scale = scale
        if layer.bias is not None:
            ql.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return ql

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_tensor(unpack(self.qweight, self.bits, self.in_features), self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        if self.parallel == "column":
            y = F.linear(copy_to_tp(x), w, self.bias)
            return gather_from_tp(y) if self.gather_output else y
        if not self.input_is_parallel:
            x = scatter_to_tp(x)
        y = reduce_from_tp(F.linear(x, w))
        return y + self.bias if self.bias is not None else y

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Move the scale with the module but keep its dtype: pass it through ``fn`` as an integer
        # tensor of the same width (``.to(dtype)``/``.half()`` leave integers alone, ``.to(device)``
        # and ``to_empty`` still apply), then view it back.
        scale = self._buffers.pop("scale", None)
        try:
            super()._apply(fn, recurse)
        finally:
            if scale is not None:
                self._buffers["scale"] = scale
        if scale is not None:
            self._buffers["scale"] = fn(scale.view(_SAME_WIDTH_INT[scale.dtype])).view(scale.dtype)
        return self

    def extra_repr(self) -> str:
        g = "row" if self.group_size is None else f"group={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"parallel={self.parallel}, bias={self.bias is not None}, scale={self.scale.dtype}")


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=tp_group())
    return t


# ------------------------------------------------------------------ the model


def _targets(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(state-dict prefix, parent module, attribute, layer) of the four linear layers of every block."""
    for i, block in enumerate(model.layers):
        for path in QUANT_TARGETS:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            yield f"layers.{i}.{path}", parent, attr, getattr(parent, attr)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE) -> nn.Module:
    """Replace the four linear layers of every block of a GLMModel by :class:`QuantizedLinear`, in
    place, layer by layer (each float layer is freed once replaced, unless the caller holds it);
    returns the model.

    Embeddings, LayerNorms and biases stay float. Works on a TP shard of the model (each rank
    quantizes its own slice; row-parallel absmax is all-reduced). Raises ValueError, before changing
    anything, for bits not 4/8, a group size that does not divide a layer's input features, or an
    already quantized model.
    """
    check_bits(bits)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model is already quantized ({model.quantization})")
    targets, layer = list(_targets(model)), None
    for name, _, _, layer in targets:
        if isinstance(layer, QuantizedLinear):
            raise ValueError(f"{name} is already quantized")
        if not isinstance(layer, ColumnParallelLinear | RowParallelLinear):
            raise TypeError(f"{name}: cannot quantize a {type(layer).__name__}")
        check_group_size(group_size, layer.weight.shape[1], name)
    places = [(name, parent, attr) for name, parent, attr, _ in targets]
    del targets, layer  # hold no reference: each float layer is freed once replaced
    for name, parent, attr in places:
        setattr(parent, attr, QuantizedLinear.from_linear(getattr(parent, attr), bits, group_size, scale_dtype,
                                                          name))
    model.quantization = quant_spec(bits, group_size, scale_dtype)
    return model


def quant_spec(bits: int, group_size: int | None, scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE) -> dict[str, Any]:
    spec: dict[str, Any] = {"bits": bits, "group_size": group_size, "method": QUANT_METHOD,
                            "scale_dtype": str(scale_dtype).replace("torch.", ""),
                            "layers": [f"layers.*.{t}" for t in QUANT_TARGETS]}
    if bits == 4:
        spec["int4_packing"] = INT4_PACKING
    return spec


def weight_bytes_report(model: nn.Module) -> dict[str, Any]:
    """Bytes of this process's tensors, as stored: the block linear layers' weights (+ scales) against
    the same weights in BF16, and everything else (embeddings, LayerNorms, biases) separately.

    Works for float models too (then ``linear_bytes`` is their float weights).
    """
    lin_w = lin_s = lin_numel = 0
    counted: set[int] = set()
    for _, _, _, layer in _targets(model):
        if isinstance(layer, QuantizedLinear):
            lin_w += layer.qweight.numel() * layer.qweight.element_size()
            lin_s += layer.scale.numel() * layer.scale.element_size()
            lin_numel += layer.in_features * layer.out_features
            counted.update((id(layer.qweight), id(layer.scale)))
        else:
            lin_w += layer.weight.numel() * layer.weight.element_size()
            lin_numel += layer.weight.numel()
            counted.add(id(layer.weight))
    by_dtype: dict[str, int] = {}
    other = other_numel = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        key = str(t.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + nbytes
        if id(t) not in counted:
            other += nbytes
            other_numel += t.numel()
    lin = lin_w + lin_s
    q = getattr(model, "quantization", None) or {}
    return {
        "bits": q.get("bits"), "group_size": q.get("group_size"),
        "linear_params": lin_numel,
        "linear_weight_bytes": lin_w, "linear_scale_bytes": lin_s, "linear_bytes": lin,
        "linear_bf16_bytes": 2 * lin_numel, "linear_ratio_vs_bf16": lin / max(2 * lin_numel, 1),
        "other_params": other_numel, "other_bytes": other, "other_bf16_bytes": 2 * other_numel,
        "total_bytes": lin + other, "total_bf16_bytes": 2 * (lin_numel + other_numel),
        "total_ratio_vs_bf16": (lin + other) / max(2 * (lin_numel + other_numel), 1),
        "by_dtype": dict(sorted(by_dtype.items())),
    }


def format_report(r: dict[str, Any]) -> str:
    def mib(b: int) -> str:
        return f"{b / 2**20:10.3f} MiB"

    what = "float" if r["bits"] is None else f"INT{r['bits']}" + (
        f" (group {r['group_size']})" if r["group_size"] else " (per row)")
    lines = [f"weight bytes, {what}:",
             f"  block linear layers  {mib(r['linear_bytes'])}  (weights {r['linear_weight_bytes']} B + scales "
             f"{r['linear_scale_bytes']} B; BF16 {mib(r['linear_bf16_bytes'])}; ratio {r['linear_ratio_vs_bf16']:.4f})",
             f"  everything else      {mib(r['other_bytes'])}  (embeddings, LayerNorms, biases; BF16 "
             f"{mib(r['other_bf16_bytes'])})",
             f"  total                {mib(r['total_bytes'])}  (BF16 {mib(r['total_bf16_bytes'])}; ratio "
             f"{r['total_ratio_vs_bf16']:.4f})",
             "  by dtype: " + ", ".join(f"{k} {v} B" for k, v in r["by_dtype"].items())]
    return "\n".join(lines)


# ------------------------------------------------------------------ the quantized export


def is_quantized_export(path: str | Path) -> bool:
    from glm_train.convert.export import is_export, read_export_config

    return is_export(path) and "quantization" in read_export_config(path)


def _check_spec(q: Any, where: str) -> tuple[int, int | None]:
    if not isinstance(q, dict) or q.get("method") != QUANT_METHOD:
        raise ValueError(f"{where}: unknown quantization {q!r} (expected method {QUANT_METHOD!r})")
    bits, gs = q.get("bits"), q.get("group_size")
    check_bits(bits)
    if gs is not None:
        check_group_size(gs, gs)
    return bits, gs


def _write_quantized(out_dir: str | Path, model_cfg: Any, tensors: Iterable[tuple[str, torch.Tensor]],
                     spec: dict[str, Any], tokenizer: str | Path | None, meta: dict[str, Any] | None) -> Path:
    """An export folder (written to a temporary sibling and renamed into place once complete) whose
    config.json and safetensors metadata carry the quantization spec."""
    from glm_train.convert.export import write_export

    return write_export(out_dir, model_cfg, tensors, tokenizer=tokenizer, meta=meta, extra={"quantization": spec})


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def save_quantized(model: nn.Module, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                   dtype: torch.dtype | None = None, meta: dict[str, Any] | None = None) -> Path:
    """Write a quantized GLMModel (TP=1) as a quantized export, atomically.

    ``dtype`` casts the float tensors (embeddings, LayerNorms, biases; None keeps theirs); the
    packed weights and their scales are written as they are.
    """
    spec = getattr(model, "quantization", None)
    if spec is None:
        raise ValueError("model is not quantized: call quantize_model first")
    if tp_world_size() > 1:
        raise ValueError("save_quantized writes full tensors: quantize a TP=1 model (or use glm-quantize)")
    scales = {f"{name}.scale" for name, _, _, _ in _targets(model)}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in model.state_dict().items():
            yield key, (t if key in scales else _cast(t, dtype))

    return _write_quantized(out_dir, model.cfg, tensors(), spec, tokenizer, meta)


def quantize_export(src: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None, *,
                    dtype: torch.dtype | None = None, scale_dtype: torch.dtype = DEFAULT_SCALE_DTYPE,
                    meta: dict[str, Any] | None = None) -> Path:
    """Quantize a checkpoint (export, run dir or checkpoint folder) straight into a quantized export,
    one tensor at a time (memory: one float tensor), without building the model. Gives the same
    tensors as ``save_quantized(quantize_model(load_model(src), ...))``."""
    from glm_train.convert.export import is_export, load_export_tensors, read_export_config, source_tokenizer

    check_bits(bits)
    if is_export(src) and "quantization" in read_export_config(src):
        raise ValueError(f"{src}: already a quantized export")
    cfg, tensors = load_export_tensors(src)
    for name, n in (("attention.qkv", cfg.hidden), ("attention.dense", cfg.hidden),
                    ("mlp.dense_in", cfg.hidden), ("mlp.dense_out", cfg.ffn_size())):
        check_group_size(group_size, n, f"{name} (model config)")
    tok = source_tokenizer(src)
    found: set[str] = set()

    def convert() -> Iterator[tuple[str, torch.Tensor]]:
        for key, t in tensors:
            if _TARGET_KEY.match(key):
                base = key[: -len(".weight")]
                q, scale = quantize_tensor(t, bits, group_size, scale_dtype)
                found.add(base)
                yield base + ".qweight", pack(q, bits)
                yield base + ".scale", scale
            else:
                yield key, _cast(t, dtype)
        if len(found) != 4 * cfg.layers:
            raise ValueError(f"{src}: found {len(found)} block linear weights, the config has {4 * cfg.layers}")

    return _write_quantized(out_dir, cfg, convert(), quant_spec(bits, group_size, scale_dtype), tok,
                            {"source": str(src), **(meta or {})})


def _local_shard(key: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor of a quantized export."""
    from glm_train.convert.export import split_tp, tp_rule

    base, leaf = key.rsplit(".", 1)
    if leaf not in ("qweight", "scale"):
        return split_tp(key, full, rank, world)
    kind, blocks = tp_rule(base + ".weight")
    if kind == "rows":
        return _shard_rows(full, blocks, rank, world)
    if leaf == "scale" and full.shape[1] == 1:
        return full  # per-row scales of a row-parallel layer: the same on every rank
    if full.shape[1] % world:
        raise ValueError(f"{key}: {full.shape[1]} columns cannot be split over tp={world} "
                         "(INT4 needs an even number of input columns per rank)")
    return full.chunk(world, dim=1)[rank]


def load_quantized(path: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """A quantized export as a GLMModel with :class:`QuantizedLinear` layers, in eval mode.

    Built on the meta device, materialized empty (integer shells for the quantized weights) and filled
    one tensor at a time, so no float copy of the quantized weights exists. ``dtype`` applies to the
    float tensors; scales keep their stored dtype. Under a TP group each rank keeps its slice.
    """
    from safetensors import safe_open

    from glm_train.convert.export import model_config_from_dict, read_export_config
    from glm_train.model import GLMModel

    where = str(path)
    meta = read_export_config(path)
    bits, group_size = _check_spec(meta.get("quantization"), where)
    scale_dtype = getattr(torch, str(meta["quantization"].get("scale_dtype", "float16")), None)
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"{where}: unknown scale dtype {meta['quantization'].get('scale_dtype')!r}")
    cfg = model_config_from_dict(meta["model"])
    with torch.device("meta"):
        model = GLMModel(cfg)
        for name, parent, attr, layer in _targets(model):
            setattr(parent, attr, QuantizedLinear.like(layer, bits, group_size, scale_dtype, name))
    model.to_empty(device=device)
    modules = dict(model.named_modules())
    target = model.state_dict()
    world, rank = tp_world_size(), tp_rank()
    seen: set[str] = set()
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            if key not in target:
                raise ValueError(f"{where}: unexpected tensor {key} for this model config")
            t = f.get_tensor(key)
            if world > 1:
                t = _local_shard(key, t, rank, world)
            dst = target[key]
            if key.endswith(".scale") and t.dtype != dst.dtype:
                if t.dtype not in _SCALE_DTYPES:
                    raise ValueError(f"{where}: {key} has dtype {t.dtype}")
                mod = modules[key.rsplit(".", 1)[0]]
                mod._buffers["scale"] = dst = torch.empty(dst.shape, dtype=t.dtype, device=dst.device)
            if key.endswith(".qweight") and t.dtype != dst.dtype:
                raise ValueError(f"{where}: {key} is {t.dtype}, INT{bits} needs {dst.dtype}")
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, the model config expects "
                                 f"{tuple(dst.shape)}")
            dst.copy_(t)
            seen.add(key)
            del t
    missing = sorted(set(target) - seen)
    if missing:
        raise ValueError(f"{where}: lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.quantization = dict(meta["quantization"])
    return model.to(dtype).eval()
