"""SwissArmyTransformer (GLM-130B release format) import/export.

The SAT checkpoints here are written by the test itself from random tensors, following SAT's layout
(per-head q|k|v rows, [x1; x2] GeGLU with x1 * gelu(x2), vocabulary/head/column splits over TP ranks),
and the imported model's logits are compared with a forward pass written here from those facts alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glm_train
from glm_train.cli.sat import export_main, import_main
from glm_train.convert.sat import SatFormatError, read_sat

L, H, HEADS, FFN, V = 2, 32, 4, 48, 64
HD = H // HEADS


# ------------------------------------------------------------------ SAT checkpoints written by hand


def sat_full_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full (tp=1) SAT tensors, scaled so every part of the block matters to the output."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    sd = {"transformer.word_embeddings.weight": rnd(V, H, std=1.0)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(H, std=0.2)
        sd[p + "input_layernorm.bias"] = rnd(H, std=0.2)
        sd[p + "attention.query_key_value.weight"] = rnd(3 * H, H, std=0.6 / math.sqrt(H))
        sd[p + "attention.query_key_value.bias"] = rnd(3 * H, std=0.2)
        sd[p + "attention.dense.weight"] = rnd(H, H, std=1 / math.sqrt(H))
        sd[p + "attention.dense.bias"] = rnd(H, std=0.2)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(H, std=0.2)
        sd[p + "post_attention_layernorm.bias"] = rnd(H, std=0.2)
        sd[p + "mlp.dense_h_to_4h.weight"] = rnd(2 * FFN, H, std=1 / math.sqrt(H))
        sd[p + "mlp.dense_h_to_4h.bias"] = rnd(2 * FFN, std=0.2)
        sd[p + "mlp.dense_4h_to_h.weight"] = rnd(H, FFN, std=1 / math.sqrt(FFN))
        sd[p + "mlp.dense_4h_to_h.bias"] = rnd(H, std=0.2)
    sd["transformer.final_layernorm.weight"] = 1 + rnd(H, std=0.2)
    sd["transformer.final_layernorm.bias"] = rnd(H, std=0.2)
    return sd


def sat_shard(full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s SAT state dict, cut as SAT's parallel layers cut it."""
    out = {}
    for key, t in full.items():
        if key.endswith("word_embeddings.weight") or "query_key_value" in key:
            part = t.chunk(tp, 0)[rank]  # vocabulary rows / whole heads (rows are grouped per head)
        elif key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            part = t.chunk(tp, 1)[rank]  # row-parallel: input columns
        elif "dense_h_to_4h" in key:
            x1, x2 = t.chunk(2, 0)  # each half split separately: rank r holds [x1_r; x2_r]
            part = torch.cat([x1.chunk(tp, 0)[rank], x2.chunk(tp, 0)[rank]])
        else:
            part = t  # LayerNorms and row-parallel biases: replicated
        out[key] = part.clone()
    for i in range(L):  # GLM-130B's rotary buffer, replicated
        out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, HD, 2).float() / HD))
    return out


def write_sat_dir(full: dict[str, torch.Tensor], tp: int, root: Path, *, latest: bool = False) -> Path:
    """SAT files under ``root`` (``root/<iteration>/`` with ``root/latest`` when ``latest``)."""
    folder = root / "1000" if latest else root
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(tp):
        torch.save({"module": sat_shard(full, r, tp)}, folder / f"mp_rank_{r:02d}_model_states.pt")
    if latest:
        (root / "latest").write_text("1000")
    return root


# ------------------------------------------------------------------ independent forward from the SAT facts


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rotate(x, pos):
    """GLM-130B's 1D rotary over the whole head dim, rotate-half layout, base 10000. x: [B, S, n, d]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.to(torch.float64)[..., None] * inv_freq  # [B, S, d/2]
    ang = torch.cat([ang, ang], -1)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()


def sat_reference_logits(full: dict[str, torch.Tensor], ids: torch.Tensor, pos: torch.Tensor,
                         prefix: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """GLM-130B's forward in float64 on the SAT tensors: DeepNorm Post-LN, per-head q|k|v, GeGLU
    x1 * gelu(x2), attention mask True = may NOT attend, tied head."""
    w = {k: v.double() for k, v in full.items()}
    b, s = ids.shape
    hd = H // heads
    alpha = math.sqrt(2 * L)
    mask = torch.ones(b, s, s, dtype=torch.float64).tril()
    for i in range(b):
        mask[i, :, : int(prefix[i])] = 1  # Part A visible to everyone
    mask = (mask < 0.5)[:, None]  # SAT convention: True = masked
    x = w["transformer.word_embeddings.weight"][ids]
    for i in range(L):
        p = f"transformer.layers.{i}."
        y = _layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"])
        qkv = y @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]
        q, k, v = qkv.view(b, s, heads, 3 * hd).split(hd, dim=-1)  # per head: q_h | k_h | v_h
        q, k = _rotate(q, pos), _rotate(k, pos)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(mask, -1e30)
        ctx = torch.einsum("bnqk,bknd->bqnd", scores.softmax(-1), v).reshape(b, s, H)
        attn = ctx @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        x = y * alpha + attn
        z = _layer_norm(x, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"])
        h4 = z @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"]
        x1, x2 = h4.chunk(2, -1)
        inner = x1 * (0.5 * x2 * (1 + torch.erf(x2 / math.sqrt(2))))
        x = z * alpha + inner @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]
    x = _layer_norm(x, w["transformer.final_layernorm.weight"], w["transformer.final_layernorm.bias"])
    return x @ w["transformer.word_embeddings.weight"].T


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 10), generator=g)
    pos = torch.stack([torch.arange(10), torch.tensor([0, 1, 2, 3, 4, 5, 6, 3, 3, 3])])  # 2nd: [MASK]-style
    prefix = torch.tensor([4, 7])
    return ids, pos, prefix


def _tensors(export_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export_dir / "model.safetensors"))


def _import(src: Path, out: Path, *extra: str) -> int:
    return import_main(["--input", str(src), "--output", str(out), "--num-attention-heads", str(HEADS), *extra])


@pytest.fixture(scope="module")
def full() -> dict[str, torch.Tensor]:
    return sat_full_weights()


@pytest.fixture(scope="module")
def imported(full, tmp_path_factory) -> dict[int, Path]:
    """Exports imported from TP=1 (plain folder), TP=2 (latest + iteration folder) and TP=4 shards."""
    root = tmp_path_factory.mktemp("sat")
    out = {}
    for tp in (1, 2, 4):
        src = write_sat_dir(full, tp, root / f"sat_tp{tp}", latest=tp == 2)
        assert _import(src, root / f"export_tp{tp}") == 0
        out[tp] = root / f"export_tp{tp}"
    return out


# ------------------------------------------------------------------ tests


def test_logits_match_independent_sat_forward(full, imported):
    ids, pos, prefix = _inputs()
    ref = sat_reference_logits(full, ids, pos, prefix)
    model = glm_train.load_model(imported[2])
    with torch.no_grad():
        got = model(ids, position_ids=pos, prefix_lengths=prefix)
    assert got.shape == (2, 10, V)
    diff = (got.double() - ref).abs().max().item()
    print(f"max |logit diff| vs the independent SAT forward: {diff:.3g} (logit scale {ref.abs().max():.3g})")
    assert diff < 1e-4
    # The comparison can tell layouts apart: the same weights read as 2 heads give other logits.
    other = sat_reference_logits(full, ids, pos, prefix, heads=2)
    assert (other - ref).abs().max().item() > 1e-2


def test_tp_layouts_import_identically(imported):
    ref = _tensors(imported[1])
    for tp in (2, 4):
        got = _tensors(imported[tp])
        assert list(got) == list(ref)
        for key in ref:
            assert torch.equal(got[key], ref[key]), key


def test_config_and_meta(imported):
    import json

    cfg = json.loads((imported[2] / "config.json").read_text())
    m = cfg["model"]
    assert (m["layers"], m["hidden"], m["heads"], m["ffn_hidden"], m["vocab_size"]) == (L, H, HEADS, FFN, V)
    # Options the SAT files do not carry come from configs/model/glm-130b.yaml.
    assert (m["deepnorm"], m["position_encoding"], m["layernorm_eps"], m["rope_base"]) == (
        "glm130b", "rope_1d", 1e-5, 10000.0)
    assert cfg["meta"]["sat_tp"] == 2 and cfg["meta"]["sat_iteration"] == "1000"


def test_round_trip_through_sat_export(full, imported, tmp_path):
    assert export_main(["--input", str(imported[1]), "--output", str(tmp_path / "sat2"), "--tp", "2"]) == 0
    files = sorted(p.name for p in (tmp_path / "sat2").iterdir())
    assert files == ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"]
    # The written shards are SAT's layout: the same as the test's own cut of the original weights.
    for r in range(2):
        ours = torch.load(tmp_path / "sat2" / files[r], weights_only=True)["module"]
        want = sat_shard(full, r, 2)
        assert set(ours) == set(want)
        for key in want:
            if key.endswith("inv_freq"):
                torch.testing.assert_close(ours[key], want[key])
            else:
                assert torch.equal(ours[key], want[key]), key
    assert _import(tmp_path / "sat2", tmp_path / "again") == 0
    a, b = _tensors(imported[1]), _tensors(tmp_path / "again")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    # Single-pass mode and tp=4 give the same files' contents.
    assert export_main(["--input", str(imported[1]), "--output", str(tmp_path / "sat4"), "--tp", "4",
                        "--single-pass"]) == 0
    assert _import(tmp_path / "sat4", tmp_path / "again4") == 0
    c = _tensors(tmp_path / "again4")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_dtype_option(imported, tmp_path, full):
    src = write_sat_dir({k: v.half() for k, v in full.items()}, 2, tmp_path / "fp16")
    assert _import(src, tmp_path / "bf16", "--dtype", "bf16") == 0
    t = _tensors(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert _import(src, tmp_path / "keep") == 0
    assert all(v.dtype == torch.float16 for v in _tensors(tmp_path / "keep").values())
    assert export_main(["--input", str(tmp_path / "keep"), "--output", str(tmp_path / "sat"), "--tp", "1"]) == 0
    sd = torch.load(tmp_path / "sat" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert sd["transformer.layers.0.attention.rotary_emb.inv_freq"].dtype == torch.float16


def _assert_failed(out: Path, rc: int, capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert rc != 0
    assert "error" in err
    for w in words:
        assert w in err, err
    # Nothing that looks like a complete export is left behind.
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not out.with_name(out.name + ".tmp").exists()


def test_missing_shard(full, tmp_path, capsys):
    src = write_sat_dir(full, 4, tmp_path / "sat")
    (src / "mp_rank_02_model_states.pt").unlink()
    rc = _import(src, tmp_path / "out")
    _assert_failed(tmp_path / "out", rc, capsys, "mp_rank_02_model_states.pt", "missing")


def test_truncated_shard(full, tmp_path, capsys):
    src = write_sat_dir(full, 2, tmp_path / "sat")
    f = src / "mp_rank_01_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    rc = _import(src, tmp_path / "out")
    _assert_failed(tmp_path / "out", rc, capsys, "mp_rank_01_model_states.pt")


def test_garbage_and_unsafe_files(full, tmp_path, capsys):
    src = write_sat_dir(full, 1, tmp_path / "sat")
    f = src / "mp_rank_00_model_states.pt"
    f.write_bytes(b"not a checkpoint at all" * 10)
    _assert_failed(tmp_path / "out", _import(src, tmp_path / "out"), capsys, "mp_rank_00_model_states.pt")
    # A pickle with a non-tensor object is refused, never unpickled.
    torch.save({"module": sat_shard(full, 0, 1), "args": Path("x")}, f)
    _assert_failed(tmp_path / "out", _import(src, tmp_path / "out"), capsys, "mp_rank_00_model_states.pt",
                   "never unpickled")


def test_wrong_number_of_heads(full, tmp_path, capsys):
    src = write_sat_dir(full, 1, tmp_path / "sat")
    rc = import_main(["--input", str(src), "--output", str(tmp_path / "out"), "--num-attention-heads", "5"])
    _assert_failed(tmp_path / "out", rc, capsys, "--num-attention-heads 5")
    # Dividing H but contradicting the checkpoint's rotary table: caught too.
    rc = import_main(["--input", str(src), "--output", str(tmp_path / "out"), "--num-attention-heads", "2"])
    _assert_failed(tmp_path / "out", rc, capsys, "implies 4 heads")
    # The default (GLM-130B's 96) does not divide H=32.
    rc = import_main(["--input", str(src), "--output", str(tmp_path / "out")])
    _assert_failed(tmp_path / "out", rc, capsys, "96")


def test_inconsistent_shards_and_keys(full, tmp_path):
    src = write_sat_dir(full, 2, tmp_path / "sat")
    f = src / "mp_rank_01_model_states.pt"
    sd = torch.load(f, weights_only=True)
    sd["module"]["transformer.layers.1.attention.dense.weight"] = torch.zeros(H, H)
    torch.save(sd, f)
    with pytest.raises(SatFormatError, match="inconsistent shapes.*layers.1.attention.dense.weight"):
        read_sat(src, HEADS)
    del sd["module"]["transformer.layers.1.attention.dense.weight"]
    torch.save(sd, f)
    with pytest.raises(SatFormatError, match="mp_rank_01.*missing key.*layers.1.attention.dense.weight"):
        read_sat(src, HEADS)
    sd["module"]["transformer.layers.1.attention.dense.weight"] = torch.zeros(H, H // 2)
    sd["module"]["transformer.position_embeddings.weight"] = torch.zeros(8, H)
    torch.save(sd, f)
    with pytest.raises(SatFormatError, match="unknown key.*position_embeddings"):
        read_sat(src, HEADS)


def test_export_refuses_bad_tp(imported, tmp_path, capsys):
    rc = export_main(["--input", str(imported[1]), "--output", str(tmp_path / "sat"), "--tp", "3"])
    err = capsys.readouterr().err
    assert rc != 0 and "--tp 3 does not divide" in err
    assert not (tmp_path / "sat").exists()


def test_model_config_option(full, tmp_path, capsys):
    src = write_sat_dir(full, 1, tmp_path / "sat")
    yml = tmp_path / "m.yaml"
    yml.write_text("heads: 4\nlayernorm_eps: 1.0e-6\nseq_length: 512\n")
    assert import_main(["--input", str(src), "--output", str(tmp_path / "out"), "--model-config", str(yml)]) == 0
    m = glm_train.load_model(tmp_path / "out").cfg
    assert (m.heads, m.layernorm_eps, m.seq_length, m.layers) == (4, 1e-6, 512, L)
    yml.write_text("hidden: 64\n")
    rc = import_main(["--input", str(src), "--output", str(tmp_path / "out2"), "--model-config", str(yml),
                      "--num-attention-heads", "4"])
    _assert_failed(tmp_path / "out2", rc, capsys, "hidden=64")
