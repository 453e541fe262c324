"""Generation under the GLM mask: KV-cache decoding against full recomputation, [MASK] filling,
beam search, batches, tensor-parallel ranks, the CLI. Tiny random models, no mocks.

The random models get random LayerNorm gains and biases (``_model``): with the default init every
LayerNorm is the identity and a tied-embedding model mostly predicts one token forever, which would
make "the same tokens" a weak check.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from glm_train.config import ModelConfig
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.infer.generate import (
    Prompt,
    SamplingConfig,
    beam_search,
    benchmark_decode,
    encode_prompt,
    generate,
    generate_batch,
    generate_ids,
    render_filled,
    sequence_logprob,
)
from glm_train.model import GLMModel
from glm_train.model.attention import KVCache
from glm_train.model.mask import prefix_lm_mask
from glm_train.model.rope import apply_rope_any, rope_tables
from tests.multiproc import run_ranks

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the lord said unto moses", "却说曹操", "and the children of israel went unto the land of the king"]
MASK_TEXTS = ["the lord [MASK] unto moses and [MASK] the land", "却说[MASK]引兵", "[MASK] the children of israel"]


@pytest.fixture(scope="module")
def tok(tiny_data) -> GLMTokenizer:
    return GLMTokenizer(tiny_data["tokenizer"])


def _model(tok: GLMTokenizer, two_d: bool = False, impl: str = "sdpa", seed: int = 3) -> GLMModel:
    cfg = ModelConfig(vocab_size=tok.padded_vocab_size(128), layers=2, hidden=64, heads=4, seq_length=64,
                      init_std=0.1, position_encoding="rope_2d" if two_d else "rope_1d", attention_impl=impl)
    model = GLMModel(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm.weight" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _allowed(tok: GLMTokenizer, vocab: int) -> torch.Tensor:
    ok = torch.zeros(vocab, dtype=torch.bool)
    ok[:tok.vocab_size] = True
    for name, i in tok.special_ids.items():
        if name not in ("<eop>", "<eod>"):
            ok[i] = False
    return ok


# ------------------------------------------------------------------ an independent training-layout reference


def _training_layout(tok: GLMTokenizer, prompt: Prompt, blanks: list[list[int]], two_d: bool):
    """Part A, then every blank as <sop> + tokens (data/blank_infilling.py's layout), positions per SPEC:
    1D: a [MASK] blank repeats its mask's position, a [gMASK] blank continues; 2D: (mask pos, 1..)."""
    ids, p1, p2 = list(prompt.part_a), list(range(len(prompt.part_a))), [0] * len(prompt.part_a)
    starts = []
    for m, cont, span in zip(prompt.blanks, prompt.continues, blanks, strict=True):
        starts.append(len(ids))
        for k, t in enumerate([tok.sop_id] + span):
            ids.append(t)
            p1.append(m if (two_d or not cont) else m + 1 + k)
            p2.append(k + 1)
    pos = torch.tensor([[p1, p2]]) if two_d else torch.tensor([p1])
    return torch.tensor([ids]), pos, starts


def _teacher_forced_logp(model, tok, prompt: Prompt, blanks, ended) -> float:
    """Summed log p of each blank's tokens (+ <eop> where it ended with one) from one training forward."""
    ids, pos, starts = _training_layout(tok, prompt, blanks, model.two_d)
    with torch.no_grad():
        logp = F.log_softmax(model(ids, pos, torch.tensor([len(prompt.part_a)]))[0].float(), dim=-1)
    total = 0.0
    for start, span, end in zip(starts, blanks, ended, strict=True):
        targets = span + ([tok.eop_id] if end else [])
        for j, t in enumerate(targets):
            total += float(logp[start + j, t])
    return total


# ------------------------------------------------------------------ the training forward is unchanged


def _reference_forward(model: GLMModel, ids, pos, prefix) -> torch.Tensor:
    """GLMModel's forward written out from its weights (fused QKV, RoPE, SDPA under the prefix mask,
    DeepNorm Post-LN, GeGLU, tied head)."""
    cfg = model.cfg
    hd = cfg.hidden // cfg.heads
    b, s = ids.shape
    h = F.embedding(ids, model.embedding.weight)
    cos, sin = rope_tables(pos, hd, cfg.rope_base, model.two_d, h.dtype)
    mask = prefix_lm_mask(prefix, s)
    for layer in model.layers:
        att, mlp = layer.attention, layer.mlp
        y = F.layer_norm(h, (cfg.hidden,), layer.input_layernorm.weight, layer.input_layernorm.bias, cfg.layernorm_eps)
        q, k, v = F.linear(y, att.qkv.weight, att.qkv.bias).view(b, s, 3, cfg.heads, hd).permute(2, 0, 3, 1, 4)
        q, k = apply_rope_any(q, cos, sin, model.two_d), apply_rope_any(k, cos, sin, model.two_d)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, cfg.hidden)
        x = y * layer.alpha + F.linear(ctx, att.dense.weight, att.dense.bias)
        ln2 = layer.post_attention_layernorm
        z = F.layer_norm(x, (cfg.hidden,), ln2.weight, ln2.bias, cfg.layernorm_eps)
        gate, up = F.linear(z, mlp.dense_in.weight, mlp.dense_in.bias).chunk(2, dim=-1)
        h = z * layer.alpha + F.linear(F.gelu(gate) * up, mlp.dense_out.weight, mlp.dense_out.bias)
    fl = model.final_layernorm
    return F.layer_norm(h, (cfg.hidden,), fl.weight, fl.bias, cfg.layernorm_eps) @ model.embedding.weight.T


@pytest.mark.parametrize("two_d", [False, True])
def test_training_forward_unchanged_and_cache_matches_it(tok, two_d):
    model = _model(tok, two_d)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (3, 20), generator=g)
    pos = torch.randint(0, 20, (3, 2, 20) if two_d else (3, 20), generator=g)
    prefix = torch.tensor([0, 7, 20])
    with torch.no_grad():
        logits = model(ids, pos, prefix)
        torch.testing.assert_close(logits, _reference_forward(model, ids, pos, prefix), rtol=1e-5, atol=1e-5)
        # The inference-only keywords: an explicit mask equal to the prefix mask gives the same bits.
        assert torch.equal(model(ids, pos, attention_mask=prefix_lm_mask(prefix, 20)), logits)
        # last_only runs the head on B rows instead of B*S: BLAS may pick another kernel for the other
        # row count (MKL on a Zen 4 CPU did: 1 ulp), so equal to rounding, not to the bit.
        torch.testing.assert_close(model(ids, pos, prefix, last_only=True)[:, 0], logits[:, -1],
                                   rtol=1e-6, atol=1e-6)
        # Part A (7 tokens) at once into the cache, then the rest one token at a time: every logit of
        # sample 1 (prefix 7) matches the full forward.
        cache = KVCache(len(model.layers), 20)
        p = pos[1:2]
        step = [model(ids[1:2, :7], p[..., :7], attention_mask=prefix_lm_mask(prefix[1:2], 7), cache=cache)]
        for t in range(7, 20):
            step.append(model(ids[1:2, t:t + 1], p[..., t:t + 1], attention_mask=torch.ones(1, 1, 1, t + 1, dtype=torch.bool),
                              cache=cache))
        torch.testing.assert_close(torch.cat(step, dim=1), logits[1:2], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, cache=KVCache(2, 20))


# ------------------------------------------------------------------ KV cache == full recomputation


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float(torch.where(x.isfinite(), x - y, torch.zeros_like(x)).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("two_d", [False, True])
@pytest.mark.parametrize("mode", ["gmask", "mask"])
@pytest.mark.parametrize("sampled", [False, True])
def test_kv_cache_equals_full_recomputation(tok, two_d, mode, sampled):
    model = _model(tok, two_d)
    prompts = [encode_prompt(tok, t, mode) for t in (TEXTS if mode == "gmask" else MASK_TEXTS)]
    assert len({len(p.part_a) for p in prompts}) == 3  # three different lengths
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0 if sampled else 0.0, top_k=0 if sampled else 40,
                         top_p=0.9, seed=11)
    for padding in ("left", "right"):
        cached = generate_ids(model, tok, prompts, cfg, use_cache=True, padding=padding, return_logits=True)
        full = generate_ids(model, tok, prompts, cfg, use_cache=False, padding=padding, return_logits=True)
        assert cached.blanks == full.blanks
        assert cached.ended == full.ended
        assert _max_diff(cached.step_logits, full.step_logits) < 1e-4
        assert all(len(b) == len(p.blanks) for b, p in zip(cached.blanks, prompts, strict=True))
    if not sampled:  # padding never leaks: each prompt alone gives the batch's tokens
        alone = [generate_ids(model, tok, [p], cfg).blanks[0] for p in prompts]
        assert alone == cached.blanks


def test_greedy_follows_the_training_layout(tok):
    """Teacher-forcing the generated blanks through the plain training forward (Part A bidirectional,
    <sop> + span per blank, SPEC positions) gives the same argmax at every Part-B position."""
    for two_d in (False, True):
        model = _model(tok, two_d)
        allowed = _allowed(tok, model.cfg.vocab_size)
        cfg = SamplingConfig(max_new_tokens=5, min_new_tokens=5, temperature=0.0, repetition_penalty=1.0)
        for mode, texts in (("gmask", TEXTS), ("mask", MASK_TEXTS)):
            for text in texts:
                prompt = encode_prompt(tok, text, mode)
                out = generate_ids(model, tok, [prompt], cfg)
                ids, pos, starts = _training_layout(tok, prompt, out.blanks[0], two_d)
                with torch.no_grad():
                    logits = model(ids, pos, torch.tensor([len(prompt.part_a)]))[0]
                logits = logits.masked_fill(~allowed, float("-inf"))
                logits[:, [tok.eop_id, tok.eod_id]] = float("-inf")  # min_new_tokens = max_new_tokens
                for start, span in zip(starts, out.blanks[0], strict=True):
                    assert span == logits[start:start + len(span)].argmax(-1).tolist()


@pytest.mark.parametrize("two_d", [False, True])
def test_scoring_layout_is_the_training_samples(tok, two_d):
    """``sequence_logprob`` (the layout generation decodes in; beam scores equal it) gives the training
    loss of real samples from data/blank_infilling.py: same Part B, same positions, same mask."""
    import numpy as np

    from glm_train.data.blank_infilling import SpecialIds, build_gmask_sample, build_mask_sample

    model = _model(tok, two_d)
    ids = SpecialIds(tok.mask_id, tok.gmask_id, tok.sop_id, tok.eop_id, tok.pad_id, tok.eod_id)
    text = np.array(tok.encode(TEXTS[2] + " " + TEXTS[0]))
    samples = [build_mask_sample(text, [2, 3], np.random.default_rng(s), 64, ids, two_d) for s in range(3)]
    samples.append(build_gmask_sample(text, 0.4, 64, ids, two_d))
    for s in samples:
        n = s.prefix_length + int(s.loss_mask.sum())
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor(s.input_ids[None, :n]), torch.tensor(s.position_ids[None, ..., :n]),
                                       torch.tensor([s.prefix_length]))[0], dim=-1)
        targets = torch.tensor(s.targets[s.prefix_length:n])
        train_lp = float(logp[s.prefix_length:n].gather(1, targets[:, None]).sum())
        part_a = s.input_ids[:s.prefix_length].tolist()
        part_b = s.input_ids[s.prefix_length:n].tolist()
        first_pos = (s.position_ids[0] if two_d else s.position_ids)[s.prefix_length:n]
        spans: list[list[int]] = []
        blanks: list[int] = []
        for j, t in enumerate(part_b):
            if t == tok.sop_id:  # the spans in the sample's (random) order, located by their position
                spans.append([])
                blanks.append(s.prefix_length - 1 if s.kind == "gmask" else int(first_pos[j]))
            else:
                spans[-1].append(t)
        prompt = Prompt(part_a, blanks, [part_a[m] == tok.gmask_id for m in blanks])
        mine = sequence_logprob(model, prompt, spans, [True] * len(spans), tok)
        assert math.isclose(mine, train_lp, rel_tol=1e-5, abs_tol=1e-4), (s.kind, mine, train_lp)


# ------------------------------------------------------------------ [MASK] filling


def test_mask_filling_keeps_part_a_and_fills_every_blank(tok):
    model = _model(tok)
    text = "the lord [MASK] unto moses, [MASK] and the [MASK] of israel"
    prompt = encode_prompt(tok, text, "mask")
    assert prompt.part_a == tok.encode(text)  # Part A is the text itself, masks included
    assert [prompt.part_a[i] for i in prompt.blanks] == [tok.mask_id] * 3
    cfg = SamplingConfig(max_new_tokens=4, min_new_tokens=1, temperature=0.0)
    out = generate_ids(model, tok, [prompt], cfg)
    assert len(out.blanks[0]) == 3 and all(1 <= len(b) <= 4 for b in out.blanks[0])
    special = set(tok.special_ids.values())
    assert not any(t in special for b in out.blanks[0] for t in b)
    filled = generate(model, tok, text, cfg, mode="mask")
    assert filled == render_filled(tok, text, out.blanks[0])
    assert "[MASK]" not in filled
    rest = filled
    for seg, blank in zip(text.split("[MASK]"), out.blanks[0] + [[]], strict=True):
        assert rest.startswith(seg)  # every piece of Part A text is kept verbatim, in order
        rest = rest[len(seg):]
        fill = tok.decode(blank)
        assert rest.startswith(fill)
        rest = rest[len(fill):]
    assert rest == ""
    # gmask mode treats [MASK] in the prompt as plain context: one continuation, Part A + [gMASK]
    g = encode_prompt(tok, text, "gmask")
    assert g.part_a == tok.encode(text) + [tok.gmask_id] and g.blanks == [len(g.part_a) - 1]
    with pytest.raises(ValueError, match="MASK"):
        encode_prompt(tok, "no blanks here", "mask")


def _eop_model(tok: GLMTokenizer) -> GLMModel:
    """A model whose head always prefers <eop>: the final LayerNorm outputs a constant along E[eop]."""
    model = _model(tok)
    with torch.no_grad():
        e = model.embedding.weight[tok.eop_id]
        model.final_layernorm.weight.zero_()
        model.final_layernorm.bias.copy_(20 * e / e.norm())
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_eop_stops_each_blank(tok, use_cache):
    model = _eop_model(tok)
    prompts = [encode_prompt(tok, MASK_TEXTS[0], "mask"), encode_prompt(tok, TEXTS[0], "gmask")]
    for min_new in (0, 2):
        cfg = SamplingConfig(max_new_tokens=6, min_new_tokens=min_new, temperature=0.0)
        out = generate_ids(model, tok, prompts, cfg, use_cache=use_cache)
        assert [len(b) for b in out.blanks[0]] == [min_new, min_new]  # both blanks, each stopped by <eop>
        assert [len(b) for b in out.blanks[1]] == [min_new]
        assert out.ended == [[True, True], [True]]
    # Sampling stops there too; beams as well.
    out = generate_ids(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0), use_cache=use_cache)
    assert out.blanks == [[[], []], [[]]] and out.ended == [[True, True], [True]]
    out = beam_search(model, tok, prompts, SamplingConfig(max_new_tokens=6, num_beams=3), use_cache=use_cache)
    assert out.blanks == [[[], []], [[]]] and out.ended == [[True, True], [True]]


def test_max_new_tokens_cuts_a_blank_and_the_next_still_starts(tok):
    model = _model(tok)
    prompt = encode_prompt(tok, MASK_TEXTS[0], "mask")
    cfg = SamplingConfig(max_new_tokens=3, min_new_tokens=3, temperature=0.0, repetition_penalty=1.0)
    for use_cache in (True, False):
        out = generate_ids(model, tok, [prompt], cfg, use_cache=use_cache)
        assert [len(b) for b in out.blanks[0]] == [3, 3] and out.ended == [[False, False]]


# ------------------------------------------------------------------ beam search


@pytest.mark.parametrize("mode", ["gmask", "mask"])
def test_beam_search(tok, mode):
    model = _model(tok)
    prompts = [encode_prompt(tok, t, mode) for t in (TEXTS if mode == "gmask" else MASK_TEXTS)]
    cfg = SamplingConfig(max_new_tokens=5, min_new_tokens=5, temperature=0.0, repetition_penalty=1.0)
    greedy = generate_ids(model, tok, prompts, cfg)
    one = beam_search(model, tok, prompts, SamplingConfig(**{**cfg.__dict__, "num_beams": 1}))
    assert one.blanks == greedy.blanks
    four = generate_ids(model, tok, prompts, SamplingConfig(**{**cfg.__dict__, "num_beams": 4}))
    assert four.scores is not None
    better = 0
    for i, p in enumerate(prompts):
        beam_lp = _teacher_forced_logp(model, tok, p, four.blanks[i], four.ended[i])
        greedy_lp = _teacher_forced_logp(model, tok, p, greedy.blanks[i], greedy.ended[i])
        assert beam_lp >= greedy_lp - 1e-4, (i, beam_lp, greedy_lp)
        assert math.isclose(four.scores[i], beam_lp, abs_tol=1e-3)  # the beam's own score is that log-prob
        assert math.isclose(sequence_logprob(model, p, four.blanks[i], four.ended[i], tok), beam_lp, abs_tol=1e-3)
        better += beam_lp > greedy_lp + 1e-4
    assert better >= 1  # on this model the search finds something greedy misses
    cached = beam_search(model, tok, prompts, SamplingConfig(**{**cfg.__dict__, "num_beams": 4}), use_cache=False)
    assert cached.blanks == four.blanks


def test_beam_search_with_eop_and_length_penalty(tok):
    model = _model(tok)
    prompts = [encode_prompt(tok, t, "gmask") for t in TEXTS]
    for lp in (0.0, 1.0, 2.0):
        out = beam_search(model, tok, prompts, SamplingConfig(max_new_tokens=6, num_beams=3, length_penalty=lp,
                                                                 repetition_penalty=1.0))
        for i, p in enumerate(prompts):
            assert all(len(b) <= 6 for b in out.blanks[i])
            assert math.isclose(out.scores[i], _teacher_forced_logp(model, tok, p, out.blanks[i], out.ended[i]),
                                abs_tol=1e-3)


def test_text_api_and_benchmark(tok):
    model = _model(tok)
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
    texts = generate_batch(model, tok, TEXTS, cfg)
    assert texts == [generate(model, tok, t, cfg) for t in TEXTS]
    assert texts == generate_batch(model, tok, TEXTS, cfg, use_cache=False, padding="right")
    filled = generate_batch(model, tok, MASK_TEXTS, cfg, mode="mask")
    assert all("[MASK]" not in f for f in filled)
    for use_cache in (True, False):
        tps = benchmark_decode(model, tok, TEXTS[0], 8, use_cache)
        assert 0 < tps < math.inf


# ------------------------------------------------------------------ tensor parallelism


def _tp_cases(model, tok) -> dict[str, object]:
    g = [encode_prompt(tok, t, "gmask") for t in TEXTS]
    m = [encode_prompt(tok, t, "mask") for t in MASK_TEXTS]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    sampled = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=5)
    out = {}
    for name, prompts in (("gmask", g), ("mask", m)):
        for cname, cfg in (("greedy", greedy), ("sampled", sampled)):
            r = generate_ids(model, tok, prompts, cfg, return_logits=True)
            out[f"{name}-{cname}"] = (r.blanks, [x.clone() for x in r.step_logits])
        b = beam_search(model, tok, prompts, SamplingConfig(max_new_tokens=4, num_beams=3))
        out[f"{name}-beam"] = (b.blanks, torch.tensor(b.scores))
    return out


def _tp_worker(rank: int, export: str, expected: str) -> None:
    from glm_train.infer.loading import load_trained
    from glm_train.parallel.state import set_tensor_parallel_group

    set_tensor_parallel_group(dist.group.WORLD)
    model, tok, _ = load_trained(export, tp_rank=rank, tp_size=2)
    assert model.layers[0].attention.heads == 2  # a shard: 4 heads over 2 ranks
    assert model.embedding.weight.shape[0] == model.cfg.vocab_size // 2
    got = _tp_cases(model, tok)
    want = torch.load(expected)
    for key, (blanks, extra) in want.items():
        assert got[key][0] == blanks, (key, got[key][0], blanks)
        if isinstance(extra, list):
            assert _max_diff(got[key][1], extra) < 1e-5, key
        else:
            torch.testing.assert_close(got[key][1], extra, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_tp2_generation_equals_tp1(tok, tiny_data, tmp_path):
    from glm_train.convert.export import write_export
    from glm_train.infer.loading import load_model

    model = _model(tok)
    export = tmp_path / "export"
    write_export(export, model.cfg, model.state_dict().items(), tokenizer=tiny_data["tokenizer"])
    with pytest.raises(ValueError, match="set_tensor_parallel_group"):
        load_model(export, tp_rank=1, tp_size=2)  # no TP group registered in this process
    expected = tmp_path / "tp1.pt"
    torch.save(_tp_cases(load_model(export), tok), expected)
    run_ranks(_tp_worker, 2, str(export), str(expected))


# ------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_modes(tok, tiny_data, tmp_path):
    from glm_train.convert.export import write_export

    model = _model(tok)
    export = tmp_path / "export"
    write_export(export, model.cfg, model.state_dict().items(), tokenizer=tiny_data["tokenizer"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "glm_train.cli.generate", f"checkpoint={export}", *args],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    text = "the lord [MASK] unto moses and [MASK] the land"
    r = run(f"prompt={text}", "mode=mask", "sampling.num_beams=2", "sampling.max_new_tokens=3", "use_cache=false",
            "device=cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    want = render_filled(tok, text, beam_search(model, tok, [encode_prompt(tok, text, "mask")],
                                                SamplingConfig(max_new_tokens=3, num_beams=2)).blanks[0])
    assert r.stdout.rstrip("\n") == want
    r = run("prompt=the lord", "mode=bogus")
    assert r.returncode == 2 and "mode" in r.stderr
    try:
        import glm_train.infer.quant  # noqa: F401 - written by another part of the project
    except ImportError:
        return
    r = run("prompt=the lord", "quant=int8", "sampling.max_new_tokens=4", "device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("the lord"), r.stderr[-2000:]
