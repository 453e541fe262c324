"""Evaluation: the GLM scorer, perplexity / bits per byte, tasks, glm-eval and the lm-eval adapter.

Everything runs on a tiny random-weight model exported with the tiny_data tokenizer and on task
files written here: no download.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from glm_train.config import ModelConfig
from glm_train.convert.export import write_export
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.infer.evaluate import (
    GLMScorer,
    choice_scores,
    lm_metrics,
    load_texts,
    perplexity,
    rolling_windows,
    split_pair,
)
from glm_train.model import GLMModel

SEQ = 32
EN_DOCS = ["And God said, Let there be light: and there was light.\nAnd God saw the light, that it was good: "
           "and God divided the light from the darkness.\nAnd God called the light Day, and the darkness he "
           "called Night.",
           "the lord said unto moses and aaron, the people went out of the land of israel."]
ZH_DOCS = ["却说曹操与刘备关羽张飞议事，孔明曰：天下大势，分久必合，合久必分。", "玄德曰：吾乃汉室宗亲。"]


def _model_cfg(vocab: int) -> ModelConfig:
    # A large embedding std makes the random model's scores depend strongly on its inputs, so a
    # leak between choices or a wrong mask would show.
    return ModelConfig(name="eval-test", layers=2, hidden=32, heads=2, seq_length=SEQ,
                       vocab_size=-(-vocab // 128) * 128, init_std=0.5)


@pytest.fixture(scope="module")
def tok(tiny_data) -> GLMTokenizer:
    return GLMTokenizer(tiny_data["tokenizer"])


@pytest.fixture(scope="module")
def model(tok) -> GLMModel:
    return GLMModel(_model_cfg(tok.vocab_size), seed=7).eval()


@pytest.fixture(scope="module")
def export(tiny_data, tok, model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "export"
    return write_export(out, model.cfg, model.state_dict().items(), tokenizer=tiny_data["tokenizer"])


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tasks")
    files = {
        "en_text": [{"text": t} for t in EN_DOCS],
        "zh_text": [{"text": t} for t in ZH_DOCS],
        "lambada": [{"context": "And God said, Let there be light: and there was", "target": " light"},
                    {"context": "And God called the light Day, and the darkness he called", "target": " Night"},
                    {"context": "却说曹操与刘备关羽张飞议事，孔明曰：天下大势，分久必合，合久必", "target": "分"}],
        "choice": [{"context": "And God said, Let there be", "choices": [" light", " darkness", " land"], "label": 0},
                   {"context": "玄德曰：吾乃汉室", "choices": ["宗亲", "天下", "曹操", "将军"], "label": 1}],
    }
    paths = {}
    for name, rows in files.items():
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[name] = p
    return paths


# ---------------------------------------------------------------- arithmetic and layout


def test_lm_metrics_by_hand():
    # 10 tokens at probability 1/4 each: 10 ln 4 nats; 20 bytes -> 20 bits / 20 bytes = 1 bpb.
    m = lm_metrics(10 * math.log(4), 10, 20)
    assert m["ppl"] == pytest.approx(4.0, rel=1e-12)
    assert m["bpb"] == pytest.approx(1.0, rel=1e-12)
    assert m["nats_per_token"] == pytest.approx(math.log(4))
    with pytest.raises(ValueError):
        lm_metrics(1.0, 0, 1)


def test_uniform_model_gives_vocab_perplexity(tok):
    """Zero embeddings -> all logits 0 -> every token has probability 1/V: ppl = V exactly and
    bpb = tokens * log2(V) / bytes, counted by hand from the tokenizer."""
    cfg = _model_cfg(tok.vocab_size)
    m = GLMModel(cfg).eval()
    with torch.no_grad():
        m.embedding.weight.zero_()
    docs = EN_DOCS + ZH_DOCS
    r = perplexity(GLMScorer(m, tok, batch_size=3), docs, stride=5)
    v = cfg.vocab_size
    n_tok = sum(len(tok.encode(d)) for d in docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert r["tokens"] == n_tok and r["bytes"] == n_bytes and r["docs"] == 4
    assert r["nats"] == pytest.approx(n_tok * math.log(v), rel=1e-6)
    assert r["ppl"] == pytest.approx(v, rel=1e-5)
    assert r["bpb"] == pytest.approx(n_tok * math.log2(v) / n_bytes, rel=1e-6)


def test_rolling_windows_score_every_token_once():
    assert rolling_windows(10, 5, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert rolling_windows(3, 5, 2) == [(0, 0, 3)]
    assert rolling_windows(0, 5, 2) == []
    for n, s, k in [(1, 8, 1), (50, 8, 3), (64, 16, 15), (100, 32, 4)]:
        w = rolling_windows(n, s, k)
        scored = [i for _, a, b in w for i in range(a, b)]
        assert scored == list(range(n))
        for c0, a, b in w:
            assert (a - c0) + (b - a) + 1 <= s  # context + [gMASK] + <sop> + (b - a - 1) tokens
            assert a - c0 == min(a, s - 1 - (b - a))  # as much context as fits
    with pytest.raises(ValueError):
        rolling_windows(10, 5, 5)


def test_sequence_layout(tok, model):
    sc = GLMScorer(model, tok)
    ids, pos, p = sc.build([5, 6, 7], [8, 9], "gmask")
    assert ids == [5, 6, 7, tok.gmask_id, tok.sop_id, 8] and p == 4 and pos == list(range(6))
    ids, pos, p = sc.build([5, 6, 7], [8, 9], "mask")
    assert ids == [5, 6, 7, tok.mask_id, tok.sop_id, 8] and pos == [0, 1, 2, 3, 3, 3]
    ids, pos, p = sc.build(list(range(100)), [1, 2, 3], "gmask")  # context cut from the left
    assert len(ids) == SEQ and ids[:p - 1] == list(range(100))[-(SEQ - 4):]
    ids, _, p = sc.build([], [1] * (SEQ - 1), "gmask")  # the longest continuation fits
    assert len(ids) == SEQ and p == 1
    with pytest.raises(ValueError):
        sc.build([], [1] * SEQ)
    assert split_pair("said unto ", "Moses") == ("said unto", " Moses")


def test_scores_match_a_direct_forward_and_batching(tok, model):
    ctx, cont = tok.encode("And God said"), tok.encode(" let there be light")
    ids = ctx + [tok.gmask_id, tok.sop_id] + cont[:-1]
    assert len(ids) <= SEQ  # nothing cut
    got = GLMScorer(model, tok, batch_size=1).score_tokens([(ctx, cont)], per_token=True)[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), prefix_lengths=torch.tensor([len(ctx) + 1]))[0].float()
    lp = torch.log_softmax(logits[len(ctx) + 1:], -1).gather(1, torch.tensor(cont)[:, None])[:, 0]
    assert got.token_logprobs == pytest.approx(lp.tolist(), abs=1e-5)
    assert got.logprob == pytest.approx(float(lp.sum()), abs=1e-4)
    reqs = [(tok.encode(c), tok.encode(x)) for c, x in
            [("the lord", " said"), ("", " unto moses"), ("却说曹操", "与刘备"), ("a " * 40, " b c d")]]
    one = [s.logprob for s in GLMScorer(model, tok, batch_size=1).score_tokens(reqs)]
    many = [s.logprob for s in GLMScorer(model, tok, batch_size=3).score_tokens(reqs)]
    assert many == pytest.approx(one, abs=1e-4)


def test_choices_are_isolated(tok, model):
    sc = GLMScorer(model, tok, batch_size=4)
    base = {"context": "And God said, Let there be", "choices": [" light", " darkness", " land"], "label": 0}
    s0 = choice_scores(sc, [base])[0]
    changed = dict(base, choices=[" light", " waters under the firmament of heaven", " land"])
    s1 = choice_scores(sc, [changed])[0]
    assert s1[0] == pytest.approx(s0[0], abs=1e-5) and s1[2] == pytest.approx(s0[2], abs=1e-5)
    assert abs(s1[1] - s0[1]) > 1e-3
    # Control: the context does reach the choices (so equality above is not vacuous).
    s2 = choice_scores(sc, [dict(base, context="And Moses said, Let there be")])[0]
    assert abs(s2[0] - s0[0]) > 1e-3


# ---------------------------------------------------------------- glm-eval


def test_glm_eval_writes_json(export, task_files, tok, model, tmp_path, capsys):
    from glm_train.cli.common import run_cli
    from glm_train.cli.eval import eval_cli

    out = tmp_path / "res.json"
    rc = run_cli(eval_cli, [f"checkpoint={export}", "quant=none", f"out={out}", "stride=7", "batch_size=4",
                            "device=cpu", f"text={{en: {task_files['en_text']}, zh: {task_files['zh_text']}}}",
                            f"lambada={{en: {task_files['lambada']}}}", f"choice={{en: {task_files['choice']}}}"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    for key in ("ppl_en", "ppl_zh", "bpb_en", "bpb_zh", "lambada_en", "mc_en"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert "lambada_zh" not in res  # the given dict replaces the default files
    assert 0 <= res["lambada_en"] <= 1 and 0 <= res["mc_en"] <= 1
    assert res["details"]["ppl_en"]["docs"] == 2 and res["details"]["lambada_en"]["n"] == 3
    # Same figures as the library on the same documents.
    r = perplexity(GLMScorer(model, tok), load_texts(task_files["zh_text"]), stride=7)
    assert res["ppl_zh"] == pytest.approx(r["ppl"], rel=1e-4)
    assert "ppl_en" in capsys.readouterr().out  # the printed table
    assert run_cli(eval_cli, [f"checkpoint={export}", "quant=int3"]) == 2
    assert run_cli(eval_cli, [f"checkpoint={export}", "tasks=ppl,bleu"]) == 2


def test_glm_eval_quant_calls_quantize_model(export, task_files, monkeypatch):
    """quant=int8 goes through glm_train.infer.quant.quantize_model(model, 8, group_size=...)."""
    quant = pytest.importorskip("glm_train.infer.quant")
    from glm_train.cli.eval import EvalConfig, run_eval

    calls = []
    real = quant.quantize_model

    def spy(model, bits, group_size=None, **kw):
        calls.append((bits, group_size))
        return real(model, bits, group_size=group_size, **kw)

    monkeypatch.setattr(quant, "quantize_model", spy)
    common = dict(checkpoint=str(export), tasks=["ppl"], text={"en": str(task_files["en_text"])}, device="cpu",
                  stride=7)
    res = run_eval(EvalConfig(quant="int8", group_size=16, **common))
    ref = run_eval(EvalConfig(quant="none", **common))
    assert calls == [(8, 16)] and res["quant"] == "int8"
    assert res["ppl_en"] != ref["ppl_en"] and res["ppl_en"] == pytest.approx(ref["ppl_en"], rel=0.05)


# ---------------------------------------------------------------- lm-eval adapter

lm_eval = pytest.importorskip("lm_eval")


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def adapter(export):
    from glm_train.infer.lm_eval_adapter import GLMTrainLM

    return GLMTrainLM.create_from_arg_string(f"checkpoint={export},batch_size=4,stride=7,device=cpu")


def test_adapter_loglikelihood_equals_scorer(adapter, tok, model, task_files):
    items = [json.loads(ln) for ln in task_files["lambada"].read_text().splitlines()]
    pairs = [(it["context"], it["target"]) for it in items] + [("", "And God"), ("said unto ", "Moses")]
    got = adapter.loglikelihood(_instances("loglikelihood", pairs))
    ours = GLMScorer(model, tok, batch_size=4).loglikelihood(pairs)
    assert [g[0] for g in got] == pytest.approx([s.logprob for s in ours], abs=1e-4)
    assert [g[1] for g in got] == [s.is_greedy for s in ours]


def test_adapter_rolling_equals_perplexity_total(adapter, tok, model):
    docs = EN_DOCS + ZH_DOCS
    got = adapter.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]))
    sc = GLMScorer(model, tok, batch_size=4)
    for d, g in zip(docs, got):
        assert -g == pytest.approx(perplexity(sc, [d], stride=7)["nats"], rel=1e-5)
    assert -sum(got) == pytest.approx(perplexity(sc, docs, stride=7)["nats"], rel=1e-5)


def test_adapter_generate_until_honours_stops(adapter, tok, model):
    from glm_train.infer.generate import SamplingConfig, generate

    full = generate(model, tok, "the lord said", SamplingConfig(max_new_tokens=12, temperature=0.0, top_k=0,
                                                                top_p=1.0, repetition_penalty=1.0))
    assert full, "the random model generated nothing"
    stop = full[len(full) // 2:][:2]
    got = adapter.generate_until(_instances("generate_until", [
        ("the lord said", {"until": [stop], "max_gen_toks": 12}),
        ("the lord said", {"until": ["\u2603"], "max_gen_toks": 12})]))
    assert got[0] == full[:full.find(stop)] and stop not in got[0]
    assert got[1] == full


@pytest.mark.slow
def test_lm_eval_simple_evaluate_local_tasks(export, task_files, tok, model, tmp_path, monkeypatch):
    """lm-eval's own evaluator, model by its registered name, on task YAMLs over local jsonl files
    (an --include_path folder; lm-eval's ~10k built-in task files are not indexed)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    import glm_train.infer.lm_eval_adapter  # noqa: F401

    (tmp_path / "ll.yaml").write_text(
        "task: glm_local_ll\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_files['lambada']}\n"
        "test_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\nmetric_list:\n  - metric: acc\n")
    (tmp_path / "roll.yaml").write_text(
        "task: glm_local_roll\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {task_files['en_text']}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    r = lm_eval.simple_evaluate(model="glm_train", model_args=f"checkpoint={export},stride=7,device=cpu",
                                tasks=["glm_local_ll", "glm_local_roll"], log_samples=True, bootstrap_iters=0,
                                task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    ll = [s["resps"][0][0][0] for s in sorted(r["samples"]["glm_local_ll"], key=lambda s: s["doc_id"])]
    items = [json.loads(ln) for ln in task_files["lambada"].read_text().splitlines()]
    ours = GLMScorer(model, tok).loglikelihood([(it["context"], it["target"]) for it in items])
    assert ll == pytest.approx([s.logprob for s in ours], abs=1e-4)
    ppl = perplexity(GLMScorer(model, tok), EN_DOCS, stride=7)
    assert r["results"]["glm_local_roll"]["bits_per_byte,none"] == pytest.approx(ppl["bpb"], rel=1e-5)


# ---------------------------------------------------------------- demo task builder


def test_demo_lambada_builder():
    from data_tools.demo_lambada import lambada_en, lambada_zh, multiple_choice

    en_docs = ["In the beginning Moses spake.\nAnd Moses went up; and the people saw Moses.\n"
               "And he said unto them, Go.\nAnd Aaron spake unto Aaron's house, even unto Aaron."]
    en = lambada_en(en_docs)
    assert en == [{"context": "In the beginning Moses spake.\nAnd Moses went up; and the people saw",
                   "target": " Moses"},
                  {"context": "In the beginning Moses spake.\nAnd Moses went up; and the people saw Moses.\n"
                              "And he said unto them, Go.\nAnd Aaron spake unto Aaron's house, even unto",
                   "target": " Aaron"}]
    zh_doc = "第一回 标题\n" + "却说" * 60 + "玄德曰：吾乃汉室宗亲。玄德拜谢玄德。"
    zh = lambada_zh([zh_doc])
    assert zh and all(zh_doc.find(it["context"] + it["target"]) >= 0 for it in zh)
    assert zh[-1]["target"] == "玄德" and len(zh[-1]["context"]) <= 150
    items = [{"context": f"c{i}", "target": f" w{i}"} for i in range(6)]
    mc = multiple_choice(items)
    assert mc == multiple_choice(items)  # deterministic
    for it, q in zip(items, mc):
        assert q["choices"][q["label"]] == it["target"] and len(set(q["choices"])) == 4
