"""glm-preprocess: round trips, worker determinism, bad input, resumability."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.preprocess import KILL_ENV, InputFile, plan_shards
from glm_train.data.indexed import IndexedDataset, check_fingerprint
from glm_train.data.tokenizer import GLMTokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]

EN = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void;\nand darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "  Leading spaces, a\ttab and trailing spaces  ",
]
ZH = [
    "滚滚长江东逝水，浪花淘尽英雄。",
    "话说天下大势，分久必合，合久必分。\n周末七国分争，并入于秦。",
    "却说张飞拍马赶到关下，关上矢石如雨，不得进而回。",
]


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny EN+ZH sentencepiece model (vocab 400) trained on inline text."""
    out = tmp_path_factory.mktemp("pre_tok")
    texts = (EN + ZH) * 20 + [" ".join(EN) * 3, "".join(ZH) * 3]
    return str(train_sentencepiece(texts, out / "tok", vocab_size=400))


@pytest.fixture(scope="session")
def tok(tok_path: str) -> GLMTokenizer:
    return GLMTokenizer(tok_path)


def run_pre(
    tok_path: str, inputs: list[Path], prefix: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "data_tools.preprocess",
        "--input",
        *map(str, inputs),
        "--tokenizer",
        tok_path,
        "--output-prefix",
        str(prefix),
        "--quiet",
        *extra,
    ]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )


def write_jsonl(path: Path, docs: list[object]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d if isinstance(d, dict) else {"text": d}, ensure_ascii=False) + "\n")
    return path


def read_docs(prefix: Path) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def output_bytes(prefix: Path) -> tuple[bytes, bytes, bytes]:
    return tuple(Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx", ".json"))  # type: ignore[return-value]


def many_docs(n: int) -> list[str]:
    pool = EN + ZH
    return [f"{k}: " + pool[k % len(pool)] * (1 + k % 3) for k in range(n)]


# ------------------------------------------------------------ round trips


def test_round_trip_jsonl(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    long_doc = ("And it came to pass, 于是玄德引兵出城。 " * 4000).strip()
    docs = EN + ZH + ["", "text with [MASK] and <eod> specials", long_doc, "x"]
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    res = run_pre(tok_path, [src], tmp_path / "out", "--keep-empty", "--batch-docs", "3")
    assert res.returncode == 0, res.stderr
    got = read_docs(tmp_path / "out")
    assert got == [tok.encode(d) for d in docs]
    assert got[len(EN) + len(ZH)] == []  # the empty document is kept, zero length
    assert len(got[-2]) > 10_000
    ds = IndexedDataset(tmp_path / "out")
    check_fingerprint(ds, tok)
    assert ds.meta["n_docs"] == len(docs) and ds.vocab_size == tok.vocab_size
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["n_bad"] == 0 and report["n_docs"] == len(docs)
    assert not (tmp_path / "out.shards").exists()


def test_round_trip_text_files(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    whole = [tmp_path / "a.txt", tmp_path / "b.txt"]
    whole[0].write_text(EN[1] + "\n", encoding="utf-8")
    whole[1].write_text(ZH[1], encoding="utf-8")
    res = run_pre(tok_path, whole, tmp_path / "whole")
    assert res.returncode == 0, res.stderr
    assert read_docs(tmp_path / "whole") == [tok.encode(EN[1] + "\n"), tok.encode(ZH[1])]

    lines = tmp_path / "lines.txt"
    lines.write_bytes(("\ufeff" + EN[0] + "\r\n" + ZH[0] + "\n" + EN[2]).encode("utf-8"))
    res = run_pre(tok_path, [lines], tmp_path / "lines", "--text-per-line")
    assert res.returncode == 0, res.stderr
    assert read_docs(tmp_path / "lines") == [tok.encode(d) for d in (EN[0], ZH[0], EN[2])]


def test_custom_text_field_and_no_trailing_newline(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "text": 1}) for d in EN), encoding="utf-8")
    res = run_pre(tok_path, [src], tmp_path / "out", "--text-field", "body")
    assert res.returncode == 0, res.stderr
    assert read_docs(tmp_path / "out") == [tok.encode(d) for d in EN]


def test_workers_give_identical_files(tmp_path: Path, tok_path: str) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", many_docs(37))
    b = write_jsonl(tmp_path / "b.jsonl", many_docs(23)[::-1])
    outs = []
    for name, extra in [
        ("w1", ["--workers", "1"]),
        ("w2", ["--workers", "2", "--batch-docs", "4", "--shard-docs", "9"]),
        ("w2b", ["--workers", "2", "--batch-docs", "5"]),
    ]:
        res = run_pre(tok_path, [a, b], tmp_path / name, *extra)
        assert res.returncode == 0, res.stderr
        outs.append(output_bytes(tmp_path / name))
    assert outs[0] == outs[1] == outs[2]
    assert len(IndexedDataset(tmp_path / "w1")) == 60


# -------------------------------------------------------------- bad input

BAD_CASES = {
    # name: (line 3 bytes, expected words in the message)
    "invalid_json": (b'{"text": "unterminated\n', "invalid JSON"),
    "blank_line": (b"\n", "blank line"),
    "not_utf8": (b'{"text": "caf\xe9"}\n', "invalid UTF-8"),
    "missing_field": (b'{"body": "no text here"}\n', "missing field 'text'"),
    "non_string": (b'{"text": 42}\n', "field 'text' is int"),
    "null_text": (b'{"text": null}\n', "field 'text' is NoneType"),
    "not_object": (b'["text"]\n', "expected a JSON object"),
    "empty_doc": (b'{"text": ""}\n', "empty document"),
    "lone_surrogate": (b'{"text": "a\\ud800b"}\n', "not valid Unicode"),
}


def _bad_file(tmp_path: Path, bad_line: bytes) -> Path:
    good = [json.dumps({"text": d}, ensure_ascii=False).encode("utf-8") + b"\n" for d in EN + ZH]
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"".join(good[:2]) + bad_line + b"".join(good[2:]))
    return src


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_with_file_and_line(
    tmp_path: Path, tok_path: str, tok: GLMTokenizer, case: str
) -> None:
    bad_line, words = BAD_CASES[case]
    src = _bad_file(tmp_path, bad_line)
    prefix = tmp_path / "out"
    res = run_pre(tok_path, [src], prefix, "--workers", "2", "--batch-docs", "2")
    assert res.returncode == 1
    assert f"{src.resolve()}:3:" in res.stderr and words in res.stderr, res.stderr
    assert not Path(f"{prefix}.json").exists()

    res = run_pre(tok_path, [src], prefix, "--skip-bad")
    assert res.returncode == 0, res.stderr
    assert "skipped 1 bad lines" in res.stderr and "bad.jsonl:3" in res.stderr
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    assert report["n_bad"] == 1 and not report["bad_truncated"]
    assert report["bad"][0]["line"] == 3 and words in report["bad"][0]["reason"]
    assert read_docs(prefix) == [tok.encode(d) for d in EN + ZH]


def test_bad_whole_text_file(tmp_path: Path, tok_path: str) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text(EN[0], encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"line one\nline two \xff\xfe\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    res = run_pre(tok_path, [ok, bad], tmp_path / "out")
    assert res.returncode == 1 and f"{bad.resolve()}:2: invalid UTF-8" in res.stderr, res.stderr
    res = run_pre(tok_path, [ok, empty], tmp_path / "out")
    assert res.returncode == 1 and f"{empty.resolve()}:1: empty document" in res.stderr, res.stderr
    res = run_pre(tok_path, [ok, empty], tmp_path / "out", "--keep-empty")
    assert res.returncode == 0 and IndexedDataset(tmp_path / "out").doc_lengths[1] == 0


def test_skip_bad_reports_first_20_and_total(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    lines, good = [], []
    for k in range(60):
        if k % 2:
            lines.append("{not json")
        else:
            lines.append(json.dumps({"text": EN[k % 4]}))
            good.append(EN[k % 4])
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = tmp_path / "out"
    res = run_pre(
        tok_path, [src], prefix, "--skip-bad", "--workers", "2", "--batch-docs", "7", "--shard-docs", "16"
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(Path(f"{prefix}.report.json").read_text())
    assert report["n_bad"] == 30 and report["bad_truncated"]
    assert [b["line"] for b in report["bad"]] == list(range(2, 42, 2))
    assert "skipped 30 bad lines (first 20:" in res.stderr
    assert read_docs(prefix) == [tok.encode(d) for d in good]


def test_failed_run_removes_old_marker(tmp_path: Path, tok_path: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", EN)
    prefix = tmp_path / "out"
    assert run_pre(tok_path, [src], prefix).returncode == 0
    assert Path(f"{prefix}.json").exists()
    src.write_text(src.read_text() + "oops\n", encoding="utf-8")
    res = run_pre(tok_path, [src], prefix)
    assert res.returncode == 1 and f"{src.resolve()}:{len(EN) + 1}:" in res.stderr
    assert not Path(f"{prefix}.json").exists() and not Path(f"{prefix}.report.json").exists()


def test_missing_input_and_bad_args(tmp_path: Path, tok_path: str) -> None:
    res = run_pre(tok_path, [tmp_path / "nope.jsonl"], tmp_path / "out")
    assert res.returncode == 1 and "input not found" in res.stderr
    src = write_jsonl(tmp_path / "in.jsonl", EN)
    res = run_pre(tok_path, [src], tmp_path / "out", "--workers", "0")
    assert res.returncode == 1 and "--workers" in res.stderr
    res = run_pre(str(tmp_path / "missing.model"), [src], tmp_path / "out")
    assert res.returncode == 1 and "cannot load tokenizer" in res.stderr
    assert not Path(f"{tmp_path / 'out'}.json").exists()


# ------------------------------------------------------------ resumability


def _shard_files(prefix: Path) -> dict[str, int]:
    d = Path(f"{prefix}.shards")
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir()) if p.name != "LOCK"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_resume_after_kill(tmp_path: Path, tok_path: str, workers: str) -> None:
    docs = many_docs(50)
    a = write_jsonl(tmp_path / "a.jsonl", docs[:31])
    b = write_jsonl(tmp_path / "b.jsonl", docs[31:])
    args = ["--shard-docs", "8", "--batch-docs", "3", "--workers", workers]
    assert run_pre(tok_path, [a, b], tmp_path / "clean", *args).returncode == 0

    prefix = tmp_path / "out"
    res = run_pre(tok_path, [a, b], prefix, *args, env={KILL_ENV: "2"})
    assert res.returncode == -9  # SIGKILL, as if the machine went away
    assert not Path(f"{prefix}.json").exists()
    first = _shard_files(prefix)
    assert sorted(first) == [f"shard_00000{i}.{ext}" for i in range(2) for ext in ("bin", "json", "lens.npy")]

    # A second kill after one more shard: the first two are untouched.
    res = run_pre(tok_path, [a, b], prefix, *args, env={KILL_ENV: "1"})
    assert res.returncode == -9 and "2/7 shards already done" in res.stderr
    second = _shard_files(prefix)
    assert {k: second[k] for k in first} == first and len(second) == 9

    res = run_pre(tok_path, [a, b], prefix, *args)
    assert res.returncode == 0, res.stderr
    assert "3/7 shards already done" in res.stderr
    assert json.loads(Path(f"{prefix}.report.json").read_text())["shards_reused"] == 3
    assert output_bytes(prefix) == output_bytes(tmp_path / "clean")
    assert not Path(f"{prefix}.shards").exists()


def test_resume_redoes_deleted_corrupt_and_stale_shards(tmp_path: Path, tok_path: str) -> None:
    docs = many_docs(40)
    a = write_jsonl(tmp_path / "a.jsonl", docs[:20])
    b = write_jsonl(tmp_path / "b.jsonl", docs[20:])
    args = ["--shard-docs", "10", "--batch-docs", "4"]
    prefix = tmp_path / "out"
    assert run_pre(tok_path, [a, b], prefix, *args, env={KILL_ENV: "4"}).returncode == -9
    shards = Path(f"{prefix}.shards")
    (shards / "shard_000001.json").unlink()  # marker gone: must be redone
    with open(shards / "shard_000002.bin", "ab") as f:  # truncated/extended data: redone
        f.write(b"\0\0")
    (shards / "shard_000000.bin.tmp.12345").write_bytes(b"junk")  # left by a killed writer
    # Changing b.jsonl (same content, new mtime) invalidates only its shard (3).
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    res = run_pre(tok_path, [a, b], prefix, *args)
    assert res.returncode == 0, res.stderr
    assert json.loads(Path(f"{prefix}.report.json").read_text())["shards_reused"] == 1
    assert run_pre(tok_path, [a, b], tmp_path / "clean", *args).returncode == 0
    assert output_bytes(prefix) == output_bytes(tmp_path / "clean")


def test_changed_arguments_do_not_reuse_shards(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": d, "alt": d.upper()} for d in EN * 5])
    prefix = tmp_path / "out"
    args = ["--shard-docs", "5"]
    assert run_pre(tok_path, [src], prefix, *args, env={KILL_ENV: "2"}).returncode == -9
    res = run_pre(tok_path, [src], prefix, *args, "--text-field", "alt")
    assert res.returncode == 0 and "already done" not in res.stderr
    assert read_docs(prefix) == [tok.encode(d.upper()) for d in EN * 5]


# --------------------------------------------------------------- planning


def test_plan_shards_cuts(tmp_path: Path) -> None:
    p1, p2, p3 = tmp_path / "1.jsonl", tmp_path / "2.jsonl", tmp_path / "3.jsonl"
    p1.write_bytes(b"".join(b"%d\n" % i for i in range(7)))
    p2.write_bytes(b"")
    p3.write_bytes(b"a\nbb\nccc")  # no trailing newline
    files = [InputFile(str(p), "jsonl", p.stat().st_size, 0) for p in (p1, p2, p3)]
    shards = plan_shards(files, shard_docs=4, batch_docs=3)
    assert [(s.index, s.start_doc, s.n_docs) for s in shards] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert shards[0].tasks == [[(0, 0, 6, 1, 3)], [(0, 6, 8, 4, 1)]]
    # Tasks restart at shard boundaries; the empty file contributes nothing.
    assert shards[1].tasks == [[(0, 8, 14, 5, 3)], [(2, 0, 2, 1, 1)]]
    assert shards[2].tasks == [[(2, 2, 8, 2, 2)]]
    # One task may span files.
    (single,) = plan_shards(files, shard_docs=10, batch_docs=10)
    assert single.tasks == [[(0, 0, 14, 1, 7), (2, 0, 8, 1, 3)]]
    whole = [InputFile(str(p), "whole", p.stat().st_size, 0) for p in (p1, p2, p3)]
    plan = plan_shards(whole, shard_docs=2, batch_docs=5)
    assert [s.n_docs for s in plan] == [2, 1] and plan[1].tasks == [[(2, 0, 8, 1, 1)]]


def test_plan_scan_crosses_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import data_tools.preprocess as pre

    monkeypatch.setattr(pre, "_SCAN_CHUNK", 7)
    lines = [b"x" * (k % 5) for k in range(40)]
    p = tmp_path / "t.txt"
    p.write_bytes(b"\n".join(lines) + b"\n")
    shards = plan_shards([InputFile(str(p), "lines", p.stat().st_size, 0)], shard_docs=10, batch_docs=4)
    data = p.read_bytes()
    got = [data[s:e].split(b"\n")[:n] for sh in shards for t in sh.tasks for (_, s, e, _, n) in t]
    assert [x for chunk in got for x in chunk] == lines
    starts = [line0 for sh in shards for t in sh.tasks for (_, _, _, line0, _) in t]
    assert starts == [1, 5, 9, 11, 15, 19, 21, 25, 29, 31, 35, 39]


def test_demo_preparation_goes_through_preprocess(tmp_path: Path, tok_path: str, tok: GLMTokenizer) -> None:
    """The demo's jsonl -> glm-preprocess step stores exactly the tokenizer's encoding of each document."""
    from data_tools.demo_corpus import run_preprocess, write_jsonl

    docs = EN + ZH + ["[MASK] inside a document", "x" * 5000]
    jsonl = write_jsonl(tmp_path / "jsonl" / "split.jsonl", docs)
    assert [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()] == docs
    report = run_preprocess(jsonl, tmp_path / "split", Path(tok_path))
    assert report["n_docs"] == len(docs)
    ds = IndexedDataset(tmp_path / "split")
    check_fingerprint(ds, tok)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(d) for d in docs]
    assert not list(tmp_path.glob("**/*.tmp.*"))
