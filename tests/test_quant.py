"""Weight-only INT8/INT4 quantization (glm_train/infer/quant.py, glm-quantize)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from glm_train.cli.quantize import main as quantize_main
from glm_train.config import ModelConfig
from glm_train.convert.export import write_export
from glm_train.infer.loading import load_model
from glm_train.infer.quant import (
    QuantizedLinear,
    dequantize_tensor,
    load_quantized,
    pack_int4,
    quantize_model,
    quantize_tensor,
    save_quantized,
    unpack_int4,
    weight_bytes_report,
)
from glm_train.model import GLMModel
from glm_train.parallel.state import set_tensor_parallel_group
from tests.multiproc import run_ranks

V = 256
TARGET_NAMES = ("attention.qkv", "attention.dense", "mlp.dense_in", "mlp.dense_out")


def _cfg() -> ModelConfig:
    # hidden 64 -> ffn 192: every linear layer's input width is a multiple of 16 (and even per TP=2 rank)
    return ModelConfig(vocab_size=V, layers=2, hidden=64, heads=4, seq_length=32)


def _model() -> GLMModel:
    return GLMModel(_cfg(), seed=7).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (2, 20), generator=g), torch.tensor([8, 5])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, prefix = _inputs()
    with torch.no_grad():
        return model(ids, prefix_lengths=prefix)


def _weight(out: int = 24, n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out, n, generator=g) * torch.logspace(-4, 1, out).unsqueeze(1)  # rows of any magnitude
    w[3, 7] = 40.0  # an outlier
    w[5] = 0.0  # an all-zero row
    return w


# ------------------------------------------------------------------ tensors


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_error_bound_per_row_and_group(bits, group_size):
    w = _weight()
    q, scale = quantize_tensor(w, bits, group_size)
    m = 2 ** (bits - 1) - 1
    groups = 1 if group_size is None else w.shape[1] // group_size
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (w.shape[0], groups)
    assert int(q.abs().max()) <= m
    gsz = w.shape[1] // groups
    absmax = w.abs().reshape(w.shape[0], groups, gsz).amax(-1)
    assert (scale.float() >= absmax / m).all()  # rounded up: the stored scale never clips
    assert (scale.float() <= absmax / m * (1 + 2 ** -10) + 6e-8).all()  # ... by at most one FP16 step
    err = (w.double() - dequantize_tensor(q, scale, torch.float64)).abs().reshape(w.shape[0], groups, gsz)
    # |w - q*scale| <= scale/2 (the 1e-5 slack covers the FP32 division before rounding)
    bound = scale.double().unsqueeze(-1) / 2 * (1 + 1e-5)
    assert (err <= bound).all(), float((err - bound).max())
    assert (q[5] == 0).all() and (scale[5] == 0).all()  # a zero row stays exactly zero
    assert int(q[3, 7]) == m  # the outlier takes the top code


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_tensor(_weight(), 8, 20)


@pytest.mark.parametrize("cols", [1, 6, 7, 33])
def test_int4_pack_roundtrip(cols):
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), generator=g, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, (cols + 1) // 2)
    assert torch.equal(unpack_int4(p, cols), q)


def test_int4_nibble_order_and_refusals():
    p = pack_int4(torch.tensor([[1, -1, 7]], dtype=torch.int8))
    assert p.tolist() == [[0xF1, 0x07]]  # column 0 in the low nibble, two's complement; odd tail padded with 0
    with pytest.raises(ValueError, match="outside"):
        pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int4(p, 5)


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("bits,rel_tol", [(8, 0.005), (4, 0.05)])
def test_quantized_logits_close_to_float(bits, rel_tol):
    model = _model()
    ref = _logits(model)
    qm = quantize_model(copy.deepcopy(model), bits)
    for block in qm.layers:
        for path in TARGET_NAMES:
            parent, attr = path.split(".")
            layer = getattr(getattr(block, parent), attr)
            assert isinstance(layer, QuantizedLinear) and layer.bits == bits
            assert layer.bias is not None and layer.bias.dtype == torch.float32
    assert torch.equal(qm.embedding.weight, model.embedding.weight)  # embeddings / LayerNorms untouched
    assert torch.equal(qm.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)
    out = _logits(qm)
    # Measured on this model: INT8 ~4e-4 of max|logit|, INT4 ~7e-3.
    assert float((out - ref).abs().max()) <= rel_tol * float(ref.abs().max())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= (0.95 if bits == 8 else 0.8)


def test_quantize_model_refuses_before_changing_anything():
    model = _model()
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(model, 4, group_size=48)  # divides 192 (FFN) but not 64 (hidden)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, 2)
    quantize_model(model, 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4)


def test_bytes_report_and_dtype_cast_keep_integers():
    qm = quantize_model(_model(), 4)
    r = weight_bytes_report(qm)
    cfg = _cfg()
    numel = cfg.layers * (3 * 64 * 64 + 64 * 64 + 2 * 192 * 64 + 64 * 192)
    assert r["linear_params"] == numel and r["linear_bf16_bytes"] == 2 * numel
    assert r["linear_weight_bytes"] == numel // 2
    assert r["linear_ratio_vs_bf16"] <= 0.27
    assert r["by_dtype"]["uint8"] == numel // 2
    qm = qm.to(torch.bfloat16)  # float tensors follow; packed weights and FP16 scales keep their dtype
    layer = qm.layers[0].mlp.dense_out
    assert layer.qweight.dtype == torch.uint8 and layer.scale.dtype == torch.float16
    assert layer.bias.dtype == torch.bfloat16 and qm.embedding.weight.dtype == torch.bfloat16
    assert _logits(qm).dtype == torch.bfloat16


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 16)])
def test_save_load_bitwise(tmp_path, bits, group_size):
    qm = quantize_model(_model(), bits, group_size)
    out = save_quantized(qm, tmp_path / "q", meta={"note": "test"})
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "glm_train.export"
    assert meta["quantization"]["bits"] == bits and meta["quantization"]["group_size"] == group_size
    assert meta["quantization"]["method"] == "absmax-row"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left
    loaded = load_model(out)  # the loading.py hook recognises a quantized export
    assert torch.equal(_logits(loaded), _logits(qm))
    state = loaded.state_dict()
    wdtype = torch.int8 if bits == 8 else torch.uint8
    for i in range(_cfg().layers):
        for path in TARGET_NAMES:
            key = f"layers.{i}.{path}"
            assert f"{key}.weight" not in state  # no float copy of the quantized weights
            assert state[f"{key}.qweight"].dtype == wdtype
            assert state[f"{key}.scale"].dtype == torch.float16
            assert torch.equal(state[f"{key}.qweight"], qm.state_dict()[f"{key}.qweight"])
    float_numel = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert float_numel < weight_bytes_report(qm)["linear_params"]  # only embeddings, norms, biases, scales
    # A second save of the same kind may replace it; a foreign folder is never replaced.
    save_quantized(loaded, out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        save_quantized(loaded, foreign)
    assert (foreign / "keep.txt").read_text() == "x"


def test_load_quantized_refuses_mismatch(tmp_path):
    out = save_quantized(quantize_model(_model(), 8), tmp_path / "q")
    meta = json.loads((out / "config.json").read_text())
    meta["model"]["hidden"] = 128
    meta["model"]["ffn_hidden"] = 384
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        load_quantized(out)
    meta["model"]["hidden"], meta["model"]["ffn_hidden"] = 64, None
    meta["quantization"]["bits"] = 4
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="INT4"):
        load_quantized(out)


# ------------------------------------------------------------------ glm-quantize


def _float_export(tmp_path: Path) -> Path:
    model = _model()
    return write_export(tmp_path / "float", model.cfg, model.state_dict().items())


def test_cli_roundtrip(tmp_path, capsys):
    src = _float_export(tmp_path)
    out = tmp_path / "int4"
    assert quantize_main(["--input", str(src), "--output", str(out), "--bits", "4", "--report"]) == 0
    assert "ratio" in capsys.readouterr().out
    # The streamed CLI path gives the same model as quantize_model on the loaded float model.
    ref = quantize_model(load_model(src), 4)
    loaded = load_model(out)
    assert torch.equal(_logits(loaded), _logits(ref))
    assert loaded.quantization["bits"] == 4
    out8 = tmp_path / "int8g16"
    assert quantize_main(["--input", str(src), "--output", str(out8), "--bits", "8", "--group-size", "16",
                          "--dtype", "bf16"]) == 0
    m8 = load_model(out8)
    assert m8.layers[1].mlp.dense_in.scale.shape == (2 * 192, 64 // 16)
    assert json.loads((out8 / "config.json").read_text())["dtype"] == ["bfloat16", "float16", "int8"]


def _no_output(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not any(".tmp." in p.name for p in tmp_path.iterdir())


def test_cli_errors(tmp_path, capsys):
    src = _float_export(tmp_path)
    out = tmp_path / "q"
    assert quantize_main(["--input", str(src), "--output", str(out), "--bits", "3"]) == 1
    assert "4 or 8" in capsys.readouterr().err and _no_output(tmp_path, out)
    assert quantize_main(["--input", str(src), "--output", str(out), "--bits", "4", "--group-size", "48"]) == 1
    assert "does not divide" in capsys.readouterr().err and _no_output(tmp_path, out)
    assert quantize_main(["--input", str(tmp_path / "missing"), "--output", str(out), "--bits", "8"]) == 1
    assert _no_output(tmp_path, out)
    # An unreadable checkpoint: the failure comes while streaming, the partial output is removed.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert quantize_main(["--input", str(bad), "--output", str(out), "--bits", "8"]) == 1
    assert "error" in capsys.readouterr().err and _no_output(tmp_path, out)
    # Quantizing a quantized export is refused.
    assert quantize_main(["--input", str(src), "--output", str(out), "--bits", "8"]) == 0
    again = tmp_path / "again"
    assert quantize_main(["--input", str(out), "--output", str(again), "--bits", "4"]) == 1
    assert "already" in capsys.readouterr().err and not again.exists()


# ------------------------------------------------------------------ TP=2 against TP=1

WORLD = 2


def _tp_worker(rank: int, export_dir: str) -> None:
    for bits, gs in ((8, None), (4, None), (4, 16)):
        set_tensor_parallel_group(None)
        ref_model = quantize_model(_model(), bits, gs)
        ref = _logits(ref_model)
        path = Path(export_dir) / f"q{bits}_{gs}"
        if rank == 0:
            save_quantized(ref_model, path)
        dist.barrier()
        set_tensor_parallel_group(dist.group.WORLD)
        tp = quantize_model(_model(), bits, gs)  # each rank quantizes its own shard
        assert tp.layers[0].mlp.dense_out.in_features == 192 // WORLD
        torch.testing.assert_close(_logits(tp), ref, rtol=1e-5, atol=1e-5)
        tp_loaded = load_model(path)  # the TP=1 quantized export, split over the two ranks
        torch.testing.assert_close(_logits(tp_loaded), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(tp_loaded.layers[0].mlp.dense_out.qweight, tp.layers[0].mlp.dense_out.qweight)
        assert torch.equal(tp_loaded.layers[0].mlp.dense_out.scale, tp.layers[0].mlp.dense_out.scale)
        dist.barrier()
    set_tensor_parallel_group(None)


@pytest.mark.slow
def test_tp2_quantized_equals_tp1(tmp_path):
    run_ranks(_tp_worker, WORLD, str(tmp_path))
