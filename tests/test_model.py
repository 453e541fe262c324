"""Model properties against independent references: the mask, RoPE, DeepNorm init, EGS, attention paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glm_train.config import ModelConfig
from glm_train.model import GLMModel
from glm_train.model.deepnorm import deepnorm_constants
from glm_train.model.embedding import shrink_gradient
from glm_train.model.mask import prefix_lm_mask
from glm_train.model.mlp import GeGLU, _GeGLUHalves, geglu, geglu_plain
from glm_train.model.rope import apply_rope, apply_rope_any, rope_cos_sin, rope_tables, rotary_qkv

V = 256


def _model(**kw) -> GLMModel:
    cfg = ModelConfig(vocab_size=V, layers=2, hidden=64, heads=4, seq_length=32, **kw)
    torch.manual_seed(0)
    return GLMModel(cfg, seed=7).eval()


def test_mask_matches_definition():
    m = prefix_lm_mask(torch.tensor([3, 0]), 6)
    for b, prefix in enumerate([3, 0]):
        for i in range(6):
            for j in range(6):
                assert bool(m[b, 0, i, j]) == (j < prefix or j <= i)


@pytest.mark.parametrize("impl", ["sdpa", "eager", "blocks"])
def test_part_b_never_changes_part_a(impl, blocks_at_any_size):
    model = _model(attention_impl=impl)
    ids = torch.randint(0, V, (1, 20))
    prefix = torch.tensor([8])
    base = model(ids, prefix_lengths=prefix)
    changed = ids.clone()
    changed[0, 15] = (changed[0, 15] + 1) % V  # a Part-B token
    out = model(changed, prefix_lengths=prefix)
    assert torch.equal(out[0, :8], base[0, :8])  # Part A: bitwise unchanged
    assert torch.equal(out[0, 8:15], base[0, 8:15])  # earlier Part-B tokens: causal
    assert not torch.allclose(out[0, 15:], base[0, 15:])


@pytest.mark.parametrize("impl", ["sdpa", "eager", "blocks"])
def test_part_a_change_reaches_every_position(impl, blocks_at_any_size):
    model = _model(attention_impl=impl)
    ids = torch.randint(0, V, (1, 20))
    prefix = torch.tensor([8])
    base = model(ids, prefix_lengths=prefix)
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % V  # late in Part A: earlier Part-A positions see it too
    out = model(changed, prefix_lengths=prefix)
    diff = (out - base).abs().amax(-1)[0]
    assert (diff > 0).all(), diff


def test_sdpa_equals_eager_fp32_softmax_with_layer_scaling():
    a, b = _model(attention_impl="sdpa"), _model(attention_impl="eager")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, V, (3, 24))
    prefix = torch.tensor([0, 5, 24])
    torch.testing.assert_close(a(ids, prefix_lengths=prefix), b(ids, prefix_lengths=prefix), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_depends_on_relative_position():
    d = 16
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([[p]]), d)
        return apply_rope(x, cos, sin)

    for p in [0, 3, 100]:
        torch.testing.assert_close(rot(q, p).norm(), q.norm())
    dots = [float((rot(q, m) * rot(k, n)).sum()) for m, n in [(5, 2), (13, 10), (103, 100)]]
    assert max(dots) - min(dots) < 1e-4
    assert abs(float((rot(q, 5) * rot(k, 2)).sum()) - float((rot(q, 2) * rot(k, 5)).sum())) > 1e-4


def test_rope_matches_complex_rotation_reference():
    # Independent reference: rotate-half RoPE == multiplying (x_i, x_{i+d/2}) pairs by e^{i p theta_i}.
    d, p = 8, 7
    x = torch.randn(d)
    cos, sin = rope_cos_sin(torch.tensor([[p]]), d)
    got = apply_rope(x.view(1, 1, 1, d), cos, sin).view(d)
    theta = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    z = torch.complex(x[: d // 2], x[d // 2:]) * torch.exp(1j * p * theta)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag]).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_qkv_matches_the_plain_formula(two_d, dtype):
    """The attention's fused RoPE against apply_rope_any on q, k and the untouched v: values, and
    the projection's gradient, also when one of the three outputs gets no gradient."""
    b, s, h, d = 2, 12, 3, 16
    positions = torch.randint(0, 50, (b, 2, s) if two_d else (b, s))
    cos, sin = rope_tables(positions, d, 1e4, two_d, dtype)
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, requires_grad=True)
    weights = [torch.randn(b, h, s, d, dtype=dtype) for _ in range(3)]
    for used in ((0, 1, 2), (0, 2), (1,)):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        ref = [apply_rope_any(q, cos, sin, two_d), apply_rope_any(k, cos, sin, two_d), v]
        got = rotary_qkv(qkv, cos, sin, two_d)
        # bf16: the plain formula rounds each product, the fused one only the sum (a few bf16 ulps).
        tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 2**-5}
        for r, g in zip(ref, got, strict=True):
            assert g.shape == r.shape == (b, h, s, d)
            torch.testing.assert_close(g, r, **tol)
        grads = [torch.autograd.grad(sum((out[i] * weights[i]).sum() for i in used), qkv)[0]
                 for out in (ref, got)]
        torch.testing.assert_close(grads[1], grads[0], **tol)


def test_compiled_rotary_qkv_keeps_the_eager_layouts():
    """Under torch.compile rotary_qkv is the plain formula; q, k and v must reach the attention kernel
    (opaque to Dynamo) with eager's strides: a strided v slowed cuDNN's attention on an H200."""
    b, s, h, d = 2, 12, 3, 16
    cos, sin = rope_tables(torch.arange(s).expand(b, s), d, 1e4, False, torch.float32)
    qkv = torch.randn(b, s, 3, h, d)
    eager = rotary_qkv(qkv, cos, sin, False)
    compiled = torch.compile(lambda x: rotary_qkv(x, cos, sin, False), fullgraph=True)(qkv)
    for e, c in zip(eager, compiled, strict=True):
        assert c.stride() == e.stride() and c.shape == e.shape
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_geglu_is_bitwise_the_plain_formula(dtype):
    """The MLP's GeGLU writes both gradient halves in place; same ops, so the same bits as autograd's
    chunk, gelu and product, values and gradients (the output gradient non-contiguous, as a
    transposed one can be)."""
    h = torch.randn(3, 10, 2 * 24, dtype=dtype)
    grad_out = torch.randn(10, 3, 24, dtype=dtype).transpose(0, 1)
    outs, grads = [], []
    for fn in (geglu_plain, geglu):
        x = h.clone().requires_grad_()
        y = fn(x)
        y.backward(grad_out)
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_halves_match_the_fused_projection(dtype, recompute):
    """On CPU the MLP computes gate and up as two contiguous matmuls (_GeGLUHalves); against the
    fused projection followed by the plain formula, in values and in the gradients of the input,
    the fused weight (both row blocks) and the bias, with and without selective recomputation."""
    cfg = ModelConfig(hidden=64, heads=4, layers=2, seq_length=16, vocab_size=V)
    mlp = GeGLU(cfg, 0, 0.5, seed=3, recompute=recompute).to(dtype)
    with torch.no_grad():
        mlp.dense_in.bias.normal_()  # zero at init: make its gradient path matter
    x0 = torch.randn(2, 16, 64, dtype=dtype)
    grad_out = torch.randn(2, 16, 64, dtype=dtype)
    results = []
    for halves in (True, False):
        x = x0.clone().requires_grad_()
        mlp.zero_grad()
        if halves:
            y = mlp(x)
        else:
            y = mlp.dense_out(geglu_plain(F.linear(x, mlp.dense_in.weight, mlp.dense_in.bias)))
        y.backward(grad_out)
        results.append([y.detach(), x.grad, mlp.dense_in.weight.grad.clone(), mlp.dense_in.bias.grad.clone()])
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **tol)
    # Without a bias: the same function minus the additions.
    x = x0.float().requires_grad_()
    w = (0.1 * torch.randn(2 * cfg.ffn_size(), 64)).requires_grad_()
    y = _GeGLUHalves.apply(x, w, None, recompute)
    y.sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = geglu_plain(F.linear(xr, wr))
    yr.sum().backward()
    for got, want in ((y, yr), (x.grad, xr.grad), (w.grad, wr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_compiled_geglu_never_concatenates_activation_gradients(recompute):
    """Under torch.compile the MLP projects gate and up separately (geglu_halves): the backward graph
    must hold no [B, S, 2f] concatenation, which Inductor lowers on CUDA to a kernel that evaluates
    both halves' formulas at every element. Values and gradients (input, fused weight, bias) against
    the eager module. AOTAutograd with graph-recording compilers: Dynamo's tracing, no C++ build."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    backward_graphs = []

    def backend(gm, example_inputs):
        def forward_compiler(g, _):
            return make_boxed_func(g.forward)

        def backward_compiler(g, _):
            backward_graphs.append(g)
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                     bw_compiler=backward_compiler)

    cfg = ModelConfig(hidden=64, heads=4, layers=2, seq_length=16, vocab_size=V)
    mlp = GeGLU(cfg, 0, 0.5, seed=3, recompute=recompute)
    with torch.no_grad():
        mlp.dense_in.bias.normal_()  # zero at init: make its gradient path matter
    x0, grad_out = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    results = []
    for module in (mlp, torch.compile(mlp, backend=backend)):
        x = x0.clone().requires_grad_()
        mlp.zero_grad()
        y = module(x)
        y.backward(grad_out)
        results.append([y.detach(), x.grad, mlp.dense_in.weight.grad.clone(), mlp.dense_in.bias.grad.clone()])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    two_f = 2 * cfg.ffn_size()
    cats = [n.meta["val"].shape for g in backward_graphs for n in g.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.cat.default]
    assert backward_graphs and cats  # the weight's and the bias's gradients: [2f, d] and [2f]
    assert all(tuple(shape) in ((two_f, 64), (two_f,)) for shape in cats), cats


@pytest.mark.parametrize("variant", ["glm130b", "deepnet"])
def test_deepnorm_init_scales(variant):
    n = 6
    cfg = ModelConfig(vocab_size=V, layers=n, hidden=256, heads=4, deepnorm=variant)
    model = GLMModel(cfg)
    alpha, beta = deepnorm_constants(n, variant)
    if variant == "glm130b":
        assert alpha == pytest.approx(math.sqrt(2 * n)) and beta == pytest.approx(1 / math.sqrt(2 * n))
    else:
        assert alpha == pytest.approx((2 * n) ** 0.25) and beta == pytest.approx((8 * n) ** -0.25)
    d, f = cfg.hidden, cfg.ffn_size()
    xavier = math.sqrt(2 / (d + d))
    layer = model.layers[3]
    assert layer.alpha == pytest.approx(alpha)
    q, k, v = layer.attention.qkv.weight.chunk(3, dim=0)
    for w, expect in [(q, xavier), (k, xavier), (v, beta * xavier), (layer.attention.dense.weight, beta * xavier)]:
        assert float(w.detach().std()) == pytest.approx(expect, rel=0.05)
    gate, up = layer.mlp.dense_in.weight.chunk(2, dim=0)
    for w in (gate, up):
        assert float(w.detach().std()) == pytest.approx(beta * math.sqrt(2 / (d + f)), rel=0.05)
    assert float(layer.mlp.dense_out.weight.detach().std()) == pytest.approx(beta * math.sqrt(2 / (f + d)), rel=0.05)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "layernorm" not in name:
            assert torch.count_nonzero(p) == 0, name


def test_ffn_is_eight_thirds_and_all_linears_have_bias():
    cfg = ModelConfig(vocab_size=V, layers=1, hidden=192, heads=4)
    assert cfg.ffn_size() == 512  # 8/3 * 192, a multiple of 64
    model = GLMModel(cfg)
    for mod in [model.layers[0].attention.qkv, model.layers[0].attention.dense,
                model.layers[0].mlp.dense_in, model.layers[0].mlp.dense_out]:
        assert mod.bias is not None


def test_output_head_is_tied_to_embedding():
    model = _model()
    h = torch.randn(1, 3, 64)
    torch.testing.assert_close(model.embedding.logits(h), h @ model.embedding.weight.T)


def test_egs_keeps_forward_and_scales_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    y = shrink_gradient(x, 0.1)
    assert torch.equal(y, x)
    g = torch.randn(4, 8)
    y.backward(g)
    torch.testing.assert_close(x.grad, 0.1 * g)


def test_egs_scales_embedding_lookup_gradient_in_model():
    # Only the lookup path is shrunk: compare against alpha=1 with the head gradient removed.
    grads = {}
    for alpha in (1.0, 0.25):
        model = _model()
        model.embedding.egs_alpha = alpha
        ids = torch.randint(0, V, (2, 10))
        emb = model.embedding(ids)
        emb.pow(2).sum().backward()
        grads[alpha] = model.embedding.weight.grad.clone()
        out_ref = torch.nn.functional.embedding(ids, model.embedding.weight)
        assert torch.equal(emb, out_ref)
    torch.testing.assert_close(grads[0.25], 0.25 * grads[1.0])


def test_two_d_positions_run_and_differ_from_1d():
    m1, m2 = _model(), _model(position_encoding="rope_2d")
    m2.load_state_dict(m1.state_dict())
    ids = torch.randint(0, V, (1, 12))
    pos2 = torch.stack([torch.arange(12), torch.zeros(12, dtype=torch.long)]).unsqueeze(0)
    pos2[0, 0, 8:] = 7
    pos2[0, 1, 8:] = torch.arange(1, 5)
    out = m2(ids, position_ids=pos2, prefix_lengths=torch.tensor([8]))
    assert out.shape == (1, 12, V)
    assert not torch.allclose(out, m1(ids, prefix_lengths=torch.tensor([8])))


def test_glm_partition_matches_glm130b_layout():
    from glm_train.train.pipeline import glm_partition

    parts = glm_partition(70, 8)
    layers = [b - a for a, b in zip(parts, parts[1:])]
    # Stage 0: embedding + 8 blocks; stages 1-6: 9 blocks; stage 7: 8 blocks + final LN + head.
    assert layers == [9, 9, 9, 9, 9, 9, 9, 10] and parts[-1] == 73
    blocks = [n - (i == 0) - 2 * (i == 7) for i, n in enumerate(layers)]
    assert blocks == [8, 9, 9, 9, 9, 9, 9, 8]
    assert glm_partition(4, 1) == [0, 7]
    assert glm_partition(4, 2) == [0, 3, 7]
