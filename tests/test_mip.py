"""MIP data: jsonl -> MIP dataset, cap, bad input, sidecar checks, sample layout, demo tasks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_tools import demo_mip
from data_tools.mip import build_mip, main, select_indices
from glm_train.data.blank_infilling import SpecialIds
from glm_train.data.mip import MIPDataset, build_mip_sample, mip_lengths, mip_paths
from glm_train.data.tokenizer import GLMTokenizer, train_sentencepiece

_EN = ("Which book of the Bible is this verse from? In the beginning God created the heaven and the "
       "earth.\nAnswer: Genesis\nFill in the blank: And God said, Let there be light.\nAnswer: light")
_ZH = "下面这段文字出自《三国演义》第几回？\n话说天下大势，分久必合，合久必分。\n答：第一回"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> GLMTokenizer:
    out = tmp_path_factory.mktemp("mip_tok")
    return GLMTokenizer(train_sentencepiece([_EN, _ZH] * 20, out / "tok", vocab_size=400))


def _write(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _records(n: int, tag: str) -> list[dict[str, str]]:
    return [{"prompt": f"{tag} question {i}: what is {i} plus one?\nAnswer:", "target": f" {i + 1}"}
            for i in range(n)]


def _decoded(ds: MIPDataset, tok: GLMTokenizer) -> list[tuple[str, str]]:
    return [(tok.decode(ds[i][0]), tok.decode(ds[i][1])) for i in range(len(ds))]


# ----------------------------------------------------------------- building


def test_round_trip(tmp_path: Path, tok: GLMTokenizer) -> None:
    recs = _records(5, "en") + [{"prompt": "话说天下大势？\n答：", "target": "第一回", "extra": 1},
                                {"prompt": "", "target": "empty prompt is allowed"}]
    src = _write(tmp_path / "qa.jsonl", recs[:3] + [""] + recs[3:])  # blank lines are ignored
    meta = build_mip(src, tmp_path / "out", tok.path)
    ds = MIPDataset(tmp_path / "out")
    assert len(ds) == len(recs) == meta["n_docs"]
    for i, r in enumerate(recs):
        prompt, target = ds[i]
        assert prompt.tolist() == tok.encode(r["prompt"])
        assert target.tolist() == tok.encode(r["target"])
        assert np.shares_memory(target, ds.indexed.tokens)  # zero-copy views into the token file
    assert ds.indexed.meta["tokenizer_fingerprint"] == tok.fingerprint()
    assert meta["datasets"][0]["name"] == "qa" and meta["datasets"][0]["doc_range"] == [0, len(recs)]
    assert int(ds.target_lengths.min()) >= 1 and ds.prompt_lengths[-1] == 0


def test_cap_is_seeded_and_per_dataset(tmp_path: Path, tok: GLMTokenizer) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "big.jsonl", _records(40, "big"))
    _write(src / "small.jsonl", _records(6, "small"))
    (src / "notes.txt").write_text("not a dataset\n")

    def build(name: str, seed: int) -> list[tuple[str, str]]:
        build_mip(src, tmp_path / name, tok, cap=10, seed=seed)
        return _decoded(MIPDataset(tmp_path / name), tok)

    a, b, c = build("a", 7), build("b", 7), build("c", 8)
    assert a == b and a != c
    meta = MIPDataset(tmp_path / "a").meta
    counts = {d["name"]: (d["valid"], d["kept"], d["doc_range"]) for d in meta["datasets"]}
    assert counts == {"big": (40, 10, [0, 10]), "small": (6, 6, [10, 16])}
    assert meta["cap"] == 10 and meta["seed"] == 7
    # Kept records are real records of their dataset, in file order, without repeats.
    numbers = [int(re.search(r"question (\d+)", p).group(1)) for p, _ in a[:10]]
    assert all(p.startswith("big") for p, _ in a[:10]) and numbers == sorted(set(numbers))
    assert [p for p, _ in a[10:]] == [r["prompt"] for r in _records(6, "small")]
    # Adding another dataset does not change which records of "big" survive.
    _write(src / "zzz.jsonl", _records(3, "zzz"))
    assert build("d", 7)[:10] == a[:10]
    assert select_indices(5, 10, 0, "x").tolist() == [0, 1, 2, 3, 4]


def test_truncation_options(tmp_path: Path, tok: GLMTokenizer) -> None:
    rec = {"prompt": "In the beginning God created the heaven and the earth.\nAnswer:",
           "target": " And God said, Let there be light."}
    src = _write(tmp_path / "t.jsonl", [rec])
    meta = build_mip(src, tmp_path / "out", tok, max_prompt_tokens=4, max_target_tokens=3)
    prompt, target = MIPDataset(tmp_path / "out")[0]
    full_p, full_t = tok.encode(rec["prompt"]), tok.encode(rec["target"])
    assert prompt.tolist() == full_p[-4:]  # prompt keeps its end ("Answer:")
    assert target.tolist() == full_t[:3]
    assert meta["prompt_truncated"] == 1 and meta["target_truncated"] == 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"prompt": "a", "target": ', "invalid JSON"),
        ('{"target": " b"}', "missing field 'prompt'"),
        ('{"prompt": "a"}', "missing field 'target'"),
        ('{"prompt": "a", "target": 3}', "field 'target' must be a string"),
        ('{"prompt": ["a"], "target": "b"}', "field 'prompt' must be a string"),
        ('{"prompt": "a", "target": ""}', "empty target"),
        ('{"prompt": "a", "target": "  "}', "empty target"),
        ('["prompt", "target"]', "expected a JSON object"),
    ],
)
def test_bad_input_fails_with_file_and_line(
    tmp_path: Path, tok: GLMTokenizer, capsys: pytest.CaptureFixture[str], line: str, reason: str
) -> None:
    good = json.dumps(_records(1, "ok")[0])
    src = _write(tmp_path / "bad.jsonl", [good, good, line, good])
    prefix = tmp_path / "out"
    # A previous complete build at the prefix must not survive looking complete.
    build_mip(_write(tmp_path / "old.jsonl", [good]), prefix, tok)
    args = ["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(tok.path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{src}:3: {reason}" in err
    assert not Path(str(prefix) + ".json").exists() and not mip_paths(prefix)[1].exists()
    with pytest.raises(FileNotFoundError):
        MIPDataset(prefix)


def test_skip_bad_reports_and_counts(tmp_path: Path, tok: GLMTokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    recs = _records(4, "ok")
    lines = [json.dumps(recs[0]), "not json", json.dumps(recs[1]), '{"prompt": "x", "target": ""}',
             json.dumps(recs[2]), json.dumps(recs[3])]
    src = _write(tmp_path / "mixed.jsonl", lines)
    args = ["--input", str(src), "--output-prefix", str(tmp_path / "out"), "--tokenizer", str(tok.path),
            "--skip-bad"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"{src}:2: invalid JSON" in err and f"{src}:4: empty target" in err
    ds = MIPDataset(tmp_path / "out")
    assert [p for p, _ in _decoded(ds, tok)] == [r["prompt"] for r in recs]
    info = ds.meta["datasets"][0]
    assert (info["records"], info["skipped"], info["kept"]) == (6, 2, 4)


def test_missing_input_exits_1(tmp_path: Path, tok: GLMTokenizer) -> None:
    args = ["--input", str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tok.path)]
    assert main(args) == 1
    (tmp_path / "empty").mkdir()
    args[1] = str(tmp_path / "empty")
    assert main(args) == 1


def test_sidecar_corruption_detected(tmp_path: Path, tok: GLMTokenizer) -> None:
    src = _write(tmp_path / "qa.jsonl", _records(4, "q"))
    prefix = tmp_path / "out"
    build_mip(src, prefix, tok)
    npy, meta_json = mip_paths(prefix)
    good = np.load(npy)
    lengths = MIPDataset(prefix).indexed.doc_lengths

    np.save(npy, good[:-1])  # wrong length
    with pytest.raises(ValueError, match="shape"):
        MIPDataset(prefix)
    np.save(npy, good.astype(np.int64))  # wrong dtype
    with pytest.raises(ValueError, match="int32"):
        MIPDataset(prefix)
    bad = good.copy()
    bad[2] = lengths[2]  # empty target
    np.save(npy, bad)
    with pytest.raises(ValueError, match="document 2"):
        MIPDataset(prefix)
    bad[2] = -1
    np.save(npy, bad)
    with pytest.raises(ValueError, match="invalid prompt length"):
        MIPDataset(prefix)
    npy.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt MIP sidecar"):
        MIPDataset(prefix)
    np.save(npy, good)
    meta = json.loads(meta_json.read_text())
    meta_json.write_text(json.dumps({**meta, "n_tokens": meta["n_tokens"] + 1}))
    with pytest.raises(ValueError, match="different build"):
        MIPDataset(prefix)
    meta_json.write_text(json.dumps(meta))
    assert len(MIPDataset(prefix)) == 4
    npy.unlink()
    with pytest.raises(FileNotFoundError, match="sidecar"):
        MIPDataset(prefix)


# ------------------------------------------------------------ sample layout

IDS = SpecialIds(mask=1000, gmask=1001, sop=1004, eop=1005, pad=1006, eod=1003)


def _check_layout(s, prompt: list[int], target: list[int], seq: int, eop: bool = True) -> None:
    p = len(prompt) + 1
    n = p + 1 + len(target)
    assert s.kind == "mip" and s.prefix_length == p
    assert s.input_ids[:p].tolist() == prompt + [IDS.gmask]
    assert s.input_ids[p:n].tolist() == [IDS.sop] + target
    assert (s.input_ids[n:] == IDS.pad).all()
    assert s.loss_mask.tolist() == [0.0] * p + [1.0] * (n - p) + [0.0] * (seq - n)
    tail = [IDS.eop] if eop else []
    assert s.targets[p:n].tolist()[: len(target) + len(tail)] == (target + tail)[: n - p]


def test_sample_layout_1d_and_2d() -> None:
    prompt, target, seq = list(range(10, 17)), [50, 51, 52], 16
    s = build_mip_sample(np.array(prompt), np.array(target), seq, IDS)
    _check_layout(s, prompt, target, seq)
    n = len(prompt) + 2 + len(target)
    assert s.position_ids.shape == (seq,)
    assert s.position_ids[:n].tolist() == list(range(n))
    assert (s.position_ids[n:] == n - 1).all()  # padding continues the last position
    assert s.spans == [(7, 10)]

    s2 = build_mip_sample(np.array(prompt), np.array(target), seq, IDS, two_d=True)
    _check_layout(s2, prompt, target, seq)
    p = len(prompt) + 1
    assert s2.position_ids.shape == (2, seq)
    assert s2.position_ids[0, :p].tolist() == list(range(p))
    assert s2.position_ids[0, p:n].tolist() == [p - 1] * (len(target) + 1)  # the [gMASK] position
    assert s2.position_ids[1, :n].tolist() == [0] * p + list(range(1, len(target) + 2))


def test_long_prompt_is_cut_from_the_left() -> None:
    prompt, target, seq = list(range(100, 140)), [7, 8, 9], 16
    s = build_mip_sample(np.array(prompt), np.array(target), seq, IDS)
    kept = prompt[-(seq - 2 - len(target)):]
    _check_layout(s, kept, target, seq)
    assert s.input_ids[seq - 1] == 9 and s.targets[seq - 1] == IDS.eop  # exactly full, answer intact


def test_long_target_keeps_half_and_never_teaches_early_stop() -> None:
    prompt, target, seq = list(range(100, 140)), list(range(200, 240)), 18
    assert mip_lengths(40, 40, seq) == (8, 8)
    s = build_mip_sample(np.array(prompt), np.array(target), seq, IDS)
    p = 9
    assert s.input_ids[:p].tolist() == prompt[-8:] + [IDS.gmask]
    assert s.input_ids[p:].tolist() == [IDS.sop] + target[:8]
    assert s.targets[p:].tolist() == target[:9]  # last position predicts the next token, not <eop>
    assert IDS.eop not in s.targets.tolist() and s.loss_mask[p:].sum() == 9
    # A short prompt leaves its share to the target.
    assert mip_lengths(2, 40, seq) == (2, 14)
    assert mip_lengths(40, 3, seq) == (13, 3)
    with pytest.raises(ValueError):
        mip_lengths(1, 1, 1)


# --------------------------------------------------------------- demo tasks

_ZH_FILL = "却说曹操刘备关羽张飞孔明玄德曰吾乃汉室宗亲兵马将军城池天下大势"


def _synthetic_bible(n_chapters: int = 60) -> list[dict]:
    books = ["Genesis", "Exodus", "Leviticus"]
    verses = []
    for k in range(n_chapters):
        book, chapter = books[k * len(books) // n_chapters], k + 1
        for v in range(1, 4):
            verses.append({"book": book, "chapter": chapter, "verse": v,
                           "text": f"And chapter{k}marker spake unto verse number {v}, saying behold."})
    return verses


def _synthetic_sanguo(n_chapters: int = 45) -> list[str]:
    return [f"第{demo_mip.chinese_chapter_number(k + 1)}回 标题\u3000甲乙\n\n  \n\t"
            + (f"章{k}号" + _ZH_FILL) * 8 + "\n\n\t" + _ZH_FILL * 3 for k in range(n_chapters)]


def test_chinese_chapter_numbers_match_the_book() -> None:
    got = {n: demo_mip.chinese_chapter_number(n) for n in (1, 10, 11, 20, 21, 99, 100, 101, 110, 111, 120)}
    assert got == {1: "一", 10: "十", 11: "十一", 20: "二十", 21: "二十一", 99: "九十九", 100: "一百",
                   101: "一百一", 110: "一百十", 111: "一百十一", 120: "一百二十"}
    with pytest.raises(ValueError, match="misaligned"):
        demo_mip.chapter_body("第二回 标题\n正文", 3)


def test_demo_tasks_use_training_chapters_only() -> None:
    verses, chapters = _synthetic_bible(), _synthetic_sanguo()
    recs = demo_mip.demo_records(verses, chapters, seed=3,
                                 sizes={"kjv_book": 200, "kjv_cloze": 200, "sanguo_chapter": 300})
    assert {k: len(v) for k, v in recs.items()} == {"kjv_book": 200, "kjv_cloze": 200, "sanguo_chapter": 300}
    assert recs == demo_mip.demo_records(verses, chapters, seed=3,
                                         sizes={"kjv_book": 200, "kjv_cloze": 200, "sanguo_chapter": 300})
    # Bible chapter 25 (k % 50 == 25) is validation; sanguo chapter index 20 (k % 40 == 20) too.
    en_seen: set[int] = set()
    for r in recs["kjv_book"]:
        k = int(re.search(r"chapter(\d+)marker", r["prompt"]).group(1))
        en_seen.add(k)
        assert r["target"] == " " + ["Genesis", "Exodus", "Leviticus"][k * 3 // 60]
        assert r["prompt"].startswith("Which book of the Bible is this verse from? ")
        assert r["prompt"].endswith("\nAnswer:")
    for r in recs["kjv_cloze"]:
        assert r["prompt"].count("____") == 1 and re.fullmatch(r" [A-Za-z]{3,}", r["target"])
        m = re.search(r"chapter(\d+)marker", r["prompt"])
        if m:
            en_seen.add(int(m.group(1)))
        filled = r["prompt"].replace("____", r["target"][1:])
        assert re.search(r"chapter(\d+)marker spake unto verse", filled)
    assert 25 not in en_seen and len(en_seen) > 40
    zh_seen: set[int] = set()
    for r in recs["sanguo_chapter"]:
        passage = r["prompt"].split("\n")[1]
        assert 100 <= len(passage) <= 200 and not re.search(r"\s", passage)
        assert "第" not in passage and "标题" not in passage  # the title line never leaks the answer
        for k in map(int, re.findall(r"章(\d+)号", passage)):
            zh_seen.add(k)
            assert r["target"] == f"第{demo_mip.chinese_chapter_number(k + 1)}回"
    assert 20 not in zh_seen and len(zh_seen) > 30
    assert demo_mip.training_chapters(chapters)[20][0] == 22  # chapter 21 (index 20) is skipped


def test_build_demo_mip_offline_and_idempotent(tmp_path: Path, tok: GLMTokenizer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    verses, chapters = _synthetic_bible(), _synthetic_sanguo()
    monkeypatch.setattr(demo_mip, "fetch_sources", lambda cache: (Path("b"), Path("s")))
    monkeypatch.setattr(demo_mip, "load_bible_verses", lambda path: verses)
    monkeypatch.setattr(demo_mip, "load_sanguo_chapters", lambda path: chapters)
    monkeypatch.setattr(demo_mip, "TASK_SIZES", {"kjv_book": 60, "kjv_cloze": 50, "sanguo_chapter": 40})
    monkeypatch.setattr(demo_mip, "DEMO_CAP", 50)
    first = demo_mip.build_demo_mip(tmp_path, tmp_path / "cache", tok.path, seed=5)
    assert not first["skipped"]
    kept = {d["name"]: d["kept"] for d in first["datasets"]}
    assert kept == {"kjv_book": 50, "kjv_cloze": 50, "sanguo_chapter": 40}
    ds = MIPDataset(tmp_path / "mip")
    assert len(ds) == 140 and ds.meta["seed"] == 5
    lines = (tmp_path / "mip_src" / "sanguo_chapter.jsonl").read_text(encoding="utf-8").splitlines()
    assert tok.decode(ds[100][1]) == json.loads(lines[0])["target"]
    mtime = (tmp_path / "mip.bin").stat().st_mtime_ns
    second = demo_mip.build_demo_mip(tmp_path, tmp_path / "cache", tok.path, seed=5)
    assert second["skipped"] and (tmp_path / "mip.bin").stat().st_mtime_ns == mtime
    # A damaged output is rebuilt.
    mip_paths(tmp_path / "mip")[0].unlink()
    assert not demo_mip.build_demo_mip(tmp_path, tmp_path / "cache", tok.path, seed=5)["skipped"]
    assert len(MIPDataset(tmp_path / "mip")) == 140
