"""Fast paths (issue 8) against the plain computation: selective recomputation, torch.compile and
the AdamW kernels must change speed and memory, never the training beyond rounding."""

from __future__ import annotations

import pytest
import torch

from benchmarks.timing import saved_storages
from glm_train.config import AttentionImpl, ModelConfig
from glm_train.model.layer import GLMBlock
from glm_train.model.mask import attention_mask, prefix_lm_mask
from glm_train.model.rope import rope_tables
from tests.test_train import _steps, _train


def _block_step(cfg: ModelConfig, recompute: frozenset[str],
                dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], int]:
    """Output, input grad and parameter grads of one block with dropout; bytes saved for backward."""
    torch.manual_seed(0)
    block = GLMBlock(cfg, 0, 1, recompute).to(dtype)
    b, s = 2, cfg.seq_length
    x = torch.randn(b, s, cfg.hidden, dtype=dtype, requires_grad=True)
    cos, sin = rope_tables(torch.arange(s).expand(b, s), cfg.hidden // cfg.heads, 1e4, False, dtype)
    mask = attention_mask(torch.tensor([5, s // 2]), s, cfg.attention_impl)  # blocks: the lengths
    torch.manual_seed(1)  # the dropout stream, replayed by recomputation
    with saved_storages() as storages:
        y = block(x, cos, sin, mask)
    y.square().sum().backward()
    return [y.detach(), x.grad, *[p.grad for p in block.parameters()]], sum(storages.values())


@pytest.mark.parametrize("impl,dtype", [(AttentionImpl.sdpa, torch.float32), (AttentionImpl.eager, torch.float32),
                                        (AttentionImpl.split, torch.float32),
                                        (AttentionImpl.blocks, torch.float32), (AttentionImpl.blocks, torch.bfloat16)])
def test_selective_recompute_is_exact_and_saves_memory(impl, dtype, blocks_at_any_size):
    # blocks without attention dropout: with it, blocks hands the call to the masked kernel. In bf16
    # blocks keeps the probabilities (on CPUs with native bf16; others upcast), which recomputation drops.
    cfg = ModelConfig(hidden=64, heads=4, seq_length=32, attention_impl=impl, dropout=0.1,
                      attention_dropout=0.0 if impl == AttentionImpl.blocks else 0.1)
    ref, ref_bytes = _block_step(cfg, frozenset(), dtype)
    saved = {}
    for parts in (frozenset({"attention"}), frozenset({"geglu"}), frozenset({"attention", "geglu"})):
        got, saved[parts] = _block_step(cfg, parts, dtype)
        # The same kernels on the same inputs, dropout replayed from the restored RNG: bitwise equal.
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), parts
        assert saved[parts] < ref_bytes, (parts, saved[parts], ref_bytes)
    assert saved[frozenset({"attention", "geglu"})] < min(saved[frozenset({"attention"})],
                                                          saved[frozenset({"geglu"})])


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [[0, 5, 13, 24], [9, 9, 9, 9], [24, 24, 24, 24], [0, 0, 0, 0]],
                         ids=["mixed", "one_length", "all_part_a", "no_part_a"])
def test_split_attention_backward_is_bitwise_autograds_composition(prefix, dtype, dropout):
    """split's own backward (_SplitPrefixAttention: the Part-A gradients added in place) against
    autograd's composition of the same two calls (own_backward=False, the path under selective
    recomputation): bitwise equal values and q, k, v gradients, dropout drawn alike; the output in
    the [B, S, H, D] layout the output projection reads; the function keeps nothing but views of q,
    k, v beside the inner calls' saved state; a second backward is refused, not wrong."""
    from torch.autograd.graph import GradientEdge

    from glm_train.model.attention import split_prefix_attention

    torch.manual_seed(0)
    b, h, s, d = 4, 3, 24, 16
    base = [torch.randn(b, h, s, d, dtype=dtype) for _ in range(3)]
    grad_out = torch.randn(b, s, h, d, dtype=dtype).transpose(1, 2)
    lengths = torch.tensor(prefix)
    results = []
    for own in (False, True):
        q, k, v = (t.clone().requires_grad_() for t in base)
        torch.manual_seed(5)
        out = split_prefix_attention(q, k, v, lengths, dropout, own_backward=own)
        if own:
            assert out.transpose(1, 2).is_contiguous()
            storages = {t.untyped_storage().data_ptr() for t in (q, k, v)}
            held = [t for part in out.grad_fn.parts for t in part[2]]
            assert held and all(t.untyped_storage().data_ptr() in storages for t in held)
            # The calls' outputs are held as gradient edges only (this torch's autograd.grad takes them).
            assert all(isinstance(part[3], GradientEdge) for part in out.grad_fn.parts)
        out.backward(grad_out, retain_graph=own)
        results.append([out.detach(), q.grad, k.grad, v.grad])
        if own:
            with pytest.raises(RuntimeError, match="runs once"):
                out.backward(grad_out)
    for got, want in zip(results[1], results[0], strict=True):
        assert torch.equal(got, want)
    with torch.no_grad():  # inference: the same calls, assembled without autograd
        torch.manual_seed(5)
        assert torch.equal(split_prefix_attention(*base, lengths, dropout), results[0][0])


@pytest.mark.slow
def test_compile_selective_recompute_and_adamw_kernels_match_eager(tiny_data, tmp_path):
    """One run with every fast path on against one with none, the same data and seed."""
    common = ["train.iters=6", "eval.every=0", "checkpoint.every=0", "model.dropout=0"]
    _train(tiny_data, tmp_path / "plain", *common, "train.optimizer_impl=for_loop")
    _train(tiny_data, tmp_path / "fast", *common, "train.compile=true", "train.optimizer_impl=fused",
           "parallel.selective_recompute=[attention,geglu]")
    plain, fast = _steps(tmp_path / "plain"), _steps(tmp_path / "fast")
    assert len(plain) == len(fast) == 6
    for a, b in zip(plain, fast, strict=True):
        # Inductor fuses and reorders the element-wise work: equal to rounding, compounded over 6 steps.
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-3), (a["step"], a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("impl", [AttentionImpl.split, AttentionImpl.blocks])
@pytest.mark.parametrize("prefix", [[0, 5, 13, 24], [9, 9, 9, 9], [24, 24, 24, 24]],
                         ids=["mixed", "one_length", "all_part_a"])
def test_length_kernels_equal_the_masked_kernel(prefix, impl, blocks_at_any_size):
    """split's two mask-free calls and blocks' per-sample calls against one SDPA call with the boolean
    mask, values and gradients: per sample (no Part A, short, long, everything Part A) and batched
    (split: one length for all)."""
    from glm_train.model.glm import GLMModel

    grads = {}
    s = 24
    ids = torch.randint(0, 200, (4, s))
    prefix = torch.tensor(prefix)
    for kernel in (AttentionImpl.sdpa, impl):
        cfg = ModelConfig(hidden=64, heads=4, layers=2, seq_length=s, vocab_size=256, attention_impl=kernel)
        model = GLMModel(cfg, seed=3)
        logits = model(ids, prefix_lengths=prefix)
        logits.float().square().mean().backward()
        grads[kernel] = [logits.detach(), *[p.grad for p in model.parameters()]]
    for a, b in zip(grads[AttentionImpl.sdpa], grads[impl], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_blocks_hand_more_threads_than_heads_to_the_masked_kernel(blocks_at_any_size):
    """With more threads than heads the per-sample calls would leave threads idle: blocks then makes
    one masked kernel call, bit for bit sdpa's; with as many threads as heads, one call per Part A
    and Part-B chunk of each sample (here 1 + 2 + 1), equal to sdpa's to rounding. bf16 blocks run on
    matmuls, which use every thread: no flash kernel call, whatever the threads."""
    from torch.profiler import profile

    from glm_train.model.glm import GLMModel
    from glm_train.model.prefix_blocks import prefix_block_attention

    ids = torch.randint(0, 200, (3, 40))
    prefix = torch.tensor([0, 17, 40])
    threads = torch.get_num_threads()
    out, calls = {}, {}
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            for impl in (AttentionImpl.sdpa, AttentionImpl.blocks):
                cfg = ModelConfig(hidden=64, heads=2, layers=1, seq_length=40, vocab_size=256, attention_impl=impl)
                model = GLMModel(cfg, seed=3)
                with profile() as prof:
                    out[n, impl] = model(ids, prefix_lengths=prefix).detach()
                calls[n, impl] = sum(e.count for e in prof.key_averages()
                                     if e.key == "aten::_scaled_dot_product_flash_attention_for_cpu")
            with profile() as prof:
                prefix_block_attention(*torch.randn(3, 3, 2, 40, 32, dtype=torch.bfloat16), prefix)
            calls[n, "bf16"] = sum(e.count for e in prof.key_averages() if "flash_attention" in e.key)
    finally:
        torch.set_num_threads(threads)
    assert calls == {(2, AttentionImpl.sdpa): 1, (2, AttentionImpl.blocks): 4, (2, "bf16"): 0,
                     (3, AttentionImpl.sdpa): 1, (3, AttentionImpl.blocks): 1, (3, "bf16"): 0}, calls
    assert torch.equal(out[3, AttentionImpl.blocks], out[3, AttentionImpl.sdpa])
    torch.testing.assert_close(out[2, AttentionImpl.blocks], out[2, AttentionImpl.sdpa], rtol=1e-5, atol=1e-6)


def test_blocks_hand_small_samples_to_the_masked_kernel():
    """Below MIN_SCORES per sample (heads x S x S) the per-sample calls cost more than they skip:
    blocks then makes sdpa's masked call, bit for bit, in FP32 and bf16 (the demo's toy model: 2 heads,
    S = 128); from the threshold on it runs its own kernels, in bf16 up to 1024 keys."""
    from glm_train.model.glm import GLMModel
    from glm_train.model.prefix_blocks import runs

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not runs(torch.float32, 0.0, 2, 511) and runs(torch.float32, 0.0, 2, 512)  # 2^19
        assert not runs(torch.bfloat16, 0.0, 2, 255) and runs(torch.bfloat16, 0.0, 2, 256)  # 2^17
        assert runs(torch.bfloat16, 0.0, 8, 1024) and not runs(torch.bfloat16, 0.0, 8, 1025)  # MATMUL_MAX_SEQ
        assert not runs(torch.bfloat16, 0.1, 2, 512) and not runs(torch.float16, 0.0, 2, 512)
        ids, prefix = torch.randint(0, 200, (2, 128)), torch.tensor([40, 100])
        for dtype in (torch.float32, torch.bfloat16):
            out = {}
            for impl in (AttentionImpl.sdpa, AttentionImpl.blocks):
                cfg = ModelConfig(hidden=128, heads=2, layers=1, seq_length=128, vocab_size=256, attention_impl=impl)
                out[impl] = GLMModel(cfg, seed=3).to(dtype)(ids, prefix_lengths=prefix)
            assert torch.equal(out[AttentionImpl.blocks], out[AttentionImpl.sdpa]), dtype
    finally:
        torch.set_num_threads(threads)


def test_sample_blocks_cover_every_query_once():
    from glm_train.model.prefix_blocks import sample_blocks

    for s in (1, 24, 256, 257, 600, 1030):
        for a in sorted({0, 1, s // 3, s - 1, s, s + 5}):
            blocks = sample_blocks(a, s)
            assert [q for q0, q1 in blocks for q in range(q0, q1)] == list(range(s)), (a, s)
            part_b = blocks[1:] if a > 0 else blocks
            assert all(q1 - q0 <= 256 for q0, q1 in part_b), blocks
            if 0 < a < s:
                assert blocks[0] == (0, a)  # Part A alone; Part B's chunks differ by at most one
                sizes = [q1 - q0 for q0, q1 in blocks[1:]]
                assert max(sizes) - min(sizes) <= 1, sizes


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "rotary_layout"])
def test_prefix_blocks_equal_masked_sdpa_over_several_chunks(strided):
    """The block kernel directly, at a length of three Part-B chunks, against masked SDPA: outputs
    and the gradients of q, k and v, with q, k, v in [B, H, S, D] or as views of [B, S, H, D]."""
    import torch.nn.functional as F

    from glm_train.model.prefix_blocks import prefix_block_attention

    b, h, s, d = 5, 2, 600, 16
    prefix = torch.tensor([0, 1, 100, 599, 600])
    g = torch.Generator().manual_seed(0)
    shape = (b, s, h, d) if strided else (b, h, s, d)
    leaves = [torch.randn(shape, generator=g, requires_grad=True) for _ in range(3)]
    grad_out = torch.randn(b, h, s, d, generator=g)
    results = []
    for masked in (True, False):
        q, k, v = (t.transpose(1, 2) for t in leaves) if strided else leaves
        out = (F.scaled_dot_product_attention(q, k, v, attn_mask=prefix_lm_mask(prefix, s)) if masked
               else prefix_block_attention(q, k, v, prefix))
        out.backward(grad_out)
        results.append([out.detach(), *[t.grad.clone() for t in leaves]])
        for t in leaves:
            t.grad = None
    for ref, got in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="FP32 or bf16"):
        prefix_block_attention(q.half(), k.half(), v.half(), prefix)


@pytest.mark.parametrize("peak", [1.0, 64.0], ids=["flat", "peaked"])
@pytest.mark.parametrize("chunk", [256, 512], ids=["three_chunks", "default_chunk"])
def test_bf16_prefix_blocks_are_as_close_to_exact_as_masked_sdpa(chunk, peak):
    """The bf16 matmul kernel against exact attention (FP64 from the same bf16 inputs), beside the
    masked bf16 SDPA kernel on the same inputs: outputs and q, k, v gradients, Part A of 0, 1, 100,
    599 and 600, in the rotary layout; with q.k as drawn and scaled up 64x (peaked attention, where
    bf16 scores or a bf16 dP would give 3.5% and 17.5% error against the flash kernel's 0.1% and
    0.7%). Measured: within 1.3x the flash kernel's error in norm, 2.2x at the largest element."""
    import torch.nn.functional as F

    from glm_train.model.prefix_blocks import _PrefixBlocksMatmul

    b, h, s, d = 5, 2, 600, 16
    prefix = torch.tensor([0, 1, 100, 599, 600])
    g = torch.Generator().manual_seed(0)
    gain = [peak**0.5, peak**0.5, 1.0]  # q, k, v
    leaves = [(torch.randn(b, s, h, d, generator=g) * c).bfloat16().requires_grad_() for c in gain]
    grad_out = torch.randn(b, h, s, d, generator=g).bfloat16()
    mask = prefix_lm_mask(prefix, s)
    results = {}
    for name in ("exact", "masked", "blocks"):
        wide = name == "exact"
        q, k, v = (t.double() if wide else t for t in (x.transpose(1, 2) for x in leaves))
        if name == "blocks":
            out = _PrefixBlocksMatmul.apply(q, k, v, prefix.tolist(), chunk)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out.backward(grad_out.double() if wide else grad_out)
        results[name] = [out.detach().double(), *[t.grad.double() for t in leaves]]
        for t in leaves:
            t.grad = None
    for i, (exact, masked, got) in enumerate(zip(*results.values(), strict=True)):
        rel, ref_rel = ((x - exact).norm() / exact.norm() for x in (got, masked))
        assert rel <= 2 * ref_rel, (i, float(rel), float(ref_rel))
        err, ref_err = (got - exact).abs().max(), (masked - exact).abs().max()
        assert err <= 4 * ref_err, (i, float(err), float(ref_err))


def test_auto_attention_is_split_on_gpus_and_blocks_elsewhere():
    from glm_train.model.mask import attention_mask

    auto = AttentionImpl.auto
    assert auto.resolve("cuda") == auto.resolve(torch.device("cuda", 1)) == auto.resolve("gpu") == AttentionImpl.split
    assert auto.resolve("cpu") == auto.resolve(torch.device("cpu")) == AttentionImpl.blocks
    assert AttentionImpl.eager.resolve("cuda") == AttentionImpl.eager  # explicit choices stay
    prefix = torch.tensor([3, 5])
    assert attention_mask(prefix, 8, auto) is prefix  # on the CPU: blocks, which takes the lengths
    assert attention_mask(prefix, 8, AttentionImpl.split) is prefix
    assert attention_mask(prefix, 8, AttentionImpl.sdpa).dtype == torch.bool


@pytest.mark.parametrize("upcast", [True, False], ids=["fp32_kernel", "bf16_kernel"])
def test_bf16_cpu_attention_either_kernel_matches_fp32(upcast, monkeypatch, blocks_at_any_size):
    """Both CPU paths of bf16 attention (FP32 kernel without native bf16, bf16 kernel with it; the machine
    picks one) agree with the fp32 model to bf16 rounding, in values and gradients."""
    import glm_train.model.attention as attention
    from glm_train.model.glm import GLMModel

    monkeypatch.setattr(attention, "cpu_attention_upcasts", lambda dtype: upcast)
    cfg = ModelConfig(hidden=64, heads=4, layers=2, seq_length=32, vocab_size=256)
    ids, prefix = torch.randint(0, 256, (2, 32)), torch.tensor([5, 17])
    outs, grads = [], []
    for dtype in (torch.float32, torch.bfloat16):
        model = GLMModel(cfg, seed=3).to(dtype)
        logits = model(ids, prefix_lengths=prefix).float()
        logits.square().mean().backward()
        outs.append(logits.detach())
        grads.append(model.layers[0].attention.qkv.weight.grad.float())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    errs = rel(outs[1], outs[0]), rel(grads[1], grads[0])  # measured: 5e-3 and 1.1e-2 either way
    assert errs[0] < 2e-2 and errs[1] < 5e-2, errs


def _pipeline_batch(prefix: list[int]) -> tuple[torch.Tensor, ...]:
    """Two samples of 48 tokens (vocabulary 320) for the pipeline module: ids, positions, the
    Part-A lengths and the Part-B loss mask."""
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(48).expand(2, 48).contiguous()
    lengths = torch.tensor(prefix)
    return ids, pos, lengths, (torch.arange(48).unsqueeze(0) >= lengths.unsqueeze(1)).float()


@pytest.mark.parametrize("prefix", [[16, 24], [20, 20]], ids=["mixed", "one_length"])
def test_split_attention_under_deepspeeds_block_recomputation_is_exact(one_process_group, prefix):
    """DeepSpeed's pipeline recomputes checkpointed blocks reentrantly: the first forward runs
    without gradients (split's inference path), the replay with them (its own backward). With
    dropout on the hidden states and in attention, every block recomputed against none: the same
    loss and bitwise the same gradients."""
    from glm_train.parallel.topology import ParallelState
    from glm_train.train.pipeline import glm_pipeline

    cfg = ModelConfig(vocab_size=320, layers=3, hidden=64, heads=4, seq_length=48, attention_impl="split",
                      dropout=0.1, attention_dropout=0.1)
    ids, pos, prefix, loss_mask = _pipeline_batch(prefix)
    results = []
    for interval in (0, 1):
        module = glm_pipeline(cfg, 1, ParallelState(1, 1, 1).topology, activation_checkpoint_interval=interval)
        module._precompute_checkpointable_values()  # as DeepSpeed's PipelineEngine does on construction
        module.train()
        torch.manual_seed(3)
        loss = module.loss_fn(module((ids, pos, prefix)), (ids, loss_mask))
        loss.backward()
        results.append([loss.detach(), *[p.grad for p in module.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_host_lengths_reads_a_tensor_once_and_again_after_a_change():
    """The Part-A lengths are read to the host once per tensor (on a GPU each read waits for the
    device); an in-place change or a new tensor with other values is read again."""
    from glm_train.model.mask import host_lengths

    t = torch.tensor([3, 0, 7])
    first = host_lengths(t)
    assert first == (3, 0, 7) and host_lengths(t) is first
    t[1] = 5  # bumps the version counter
    assert host_lengths(t) == (3, 5, 7)
    assert host_lengths(torch.tensor([1, 2, 3])) == (1, 2, 3)
    del t
    assert host_lengths(torch.tensor([4, 4, 4])) == (4, 4, 4)  # a freed tensor's slot is not reused


@pytest.mark.parametrize("impl", [AttentionImpl.split, AttentionImpl.blocks])
def test_pipeline_stage_reads_the_part_a_lengths_once_per_micro_batch(one_process_group, impl, monkeypatch,
                                                                      blocks_at_any_size):
    """Every block of a stage gets the same lengths tensor: one host read per forward pass, not one
    per block (each is a device synchronization on a GPU), with the same loss as the masked kernel."""
    from glm_train.parallel.topology import ParallelState
    from glm_train.train.pipeline import glm_pipeline

    reads = []
    real = torch.Tensor.tolist

    def counted(self):  # the real read, counted
        reads.append(self.shape)
        return real(self)

    ids, pos, prefix, loss_mask = _pipeline_batch([16, 30])
    losses = []
    for kernel in (AttentionImpl.sdpa, impl):
        cfg = ModelConfig(vocab_size=320, layers=4, hidden=64, heads=4, seq_length=48, attention_impl=kernel)
        module = glm_pipeline(cfg, 1, ParallelState(1, 1, 1).topology)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "tolist", counted)
            reads.clear()
            losses.append(module.loss_fn(module((ids, pos, prefix.clone())), (ids, loss_mask)))
            losses[-1].backward()
        assert len(reads) == (0 if kernel == AttentionImpl.sdpa else 1), (kernel, reads)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
