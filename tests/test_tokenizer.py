"""Tokenizer tests on small sentencepiece models trained from inline text (no downloads)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from glm_train.data.tokenizer import (
    SPECIAL_TOKENS,
    GLMTokenizer,
    train_sentencepiece,
    training_sentences,
)

EN = (
    "In the beginning God created the heaven and the earth.\n"
    "And the earth was without form, and void; and darkness was upon the face of the deep.\n"
    "And God said, Let there be light: and there was light.\n"
    "And God saw the light, that it was good: and God divided the light from the darkness.\n"
)
ZH = (
    "第一回 宴桃园豪杰三结义\u3000斩黄巾英雄首立功\n\n  \n"
    "\t滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。\n\n"
    "\t青山依旧在，几度夕阳红。白发渔樵江渚上，惯看秋月春风。\n\n"
    "\t话说天下大势，分久必合，合久必分。玄德曰：“我本汉室宗亲。”\n"
)
# One long line without newlines: must be chunked for training, not dropped.
LONG_LINE = "天下大势分久必合合久必分" * 600

ROUND_TRIP_TEXTS = [
    EN,
    ZH,
    " leading space, then  two   three    spaces and trailing  ",
    "tabs\tinside\t\tand\n\nnewlines\n",
    "\n\n  \n\t",
    "全角标点：，。“引号”\u3000全角空格\u3000\u3000两个",
    "mixed 中文 and English，標點 ok？ 123 😀 \r\n end",
    "[gMASK]<sop> after a special\t [MASK]  spaces<eop><eod>",
    "<pad><pad>",
    "",
    " ",
]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spm")
    texts = [EN, ZH] * 20 + [LONG_LINE]
    return train_sentencepiece(texts, out / "tok", vocab_size=400)


@pytest.fixture(scope="session")
def tok(model_path: Path) -> GLMTokenizer:
    return GLMTokenizer(model_path)


@pytest.fixture(scope="session")
def foreign_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained with sentencepiece's defaults (unigram, NFKC, dummy prefix)."""
    out = tmp_path_factory.mktemp("foreign")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences([EN, ZH] * 20)),
        model_writer=buf,
        vocab_size=150,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = out / "foreign.model"
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_exact(tok: GLMTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_long_line_round_trip(tok: GLMTokenizer) -> None:
    assert tok.decode(tok.encode(LONG_LINE)) == LONG_LINE


def test_newline_and_tab_are_single_tokens(tok: GLMTokenizer) -> None:
    assert len(tok.encode("\n")) == 1
    assert len(tok.encode("\t")) == 1
    assert tok.encode("a\nb").count(tok.encode("\n")[0]) == 1


def test_special_ids_layout(tok: GLMTokenizer) -> None:
    sp_size = tok.sp_vocab_size
    assert sp_size == 400
    assert tok.vocab_size == sp_size + len(SPECIAL_TOKENS)
    assert tok.special_ids == {t: sp_size + i for i, t in enumerate(SPECIAL_TOKENS)}
    named = [tok.mask_id, tok.gmask_id, tok.smask_id, tok.eod_id, tok.sop_id, tok.eop_id, tok.pad_id]
    assert named == list(range(sp_size, sp_size + 7))


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_is_one_id(tok: GLMTokenizer, special: str) -> None:
    sid = tok.special_ids[special]
    assert tok.encode(special) == [sid]
    ids = tok.encode(f"天下{special}大势 and{special}more")
    assert ids.count(sid) == 2
    assert sum(i >= tok.sp_vocab_size for i in ids) == 2
    assert tok.decode([sid]) == special
    assert tok.id_to_token(sid) == special


def test_decode_skips_padding_region(tok: GLMTokenizer) -> None:
    ids = tok.encode("hello 天下")
    padded = tok.padded_vocab_size(128)
    assert tok.decode([*ids, tok.vocab_size, padded - 1]) == "hello 天下"
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_padded_vocab_size(tok: GLMTokenizer) -> None:
    assert tok.vocab_size == 407
    assert tok.padded_vocab_size() == 512
    assert tok.padded_vocab_size(8) == 408
    assert tok.padded_vocab_size(1) == 407
    assert tok.padded_vocab_size(407) == 407
    with pytest.raises(ValueError):
        tok.padded_vocab_size(0)


def test_encode_batch_matches_encode(tok: GLMTokenizer) -> None:
    assert tok.encode_batch(ROUND_TRIP_TEXTS) == [tok.encode(t) for t in ROUND_TRIP_TEXTS]
    assert tok.encode_batch([]) == []


def test_foreign_model_gets_specials_appended(foreign_model: Path, tok: GLMTokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(foreign_model))
    ftok = GLMTokenizer(foreign_model)
    assert ftok.sp_vocab_size == sp.get_piece_size()
    assert ftok.mask_id == sp.get_piece_size()
    assert ftok.pad_id == sp.get_piece_size() + 6
    ids = ftok.encode("the light[gMASK]天下<eod>")
    assert ids.count(ftok.gmask_id) == 1 and ids[-1] == ftok.eod_id
    # Foreign models may normalize, but text without extra spaces survives.
    assert ftok.decode(ftok.encode("God said[MASK]light")) == "God said[MASK]light"
    assert ftok.fingerprint() != tok.fingerprint()


def test_fingerprint_and_pickle(tok: GLMTokenizer, model_path: Path) -> None:
    fp = tok.fingerprint()
    assert len(fp) == 64 and fp == GLMTokenizer(model_path).fingerprint()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint() == fp
    assert clone.encode(ZH) == tok.encode(ZH)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.model"):
        GLMTokenizer(tmp_path / "nope.model")


def test_training_sentences_chunk_without_loss() -> None:
    sents = training_sentences(["a\n\nb", LONG_LINE], max_bytes=1000)
    assert sents[:2] == ["a", "b"]
    assert all(0 < len(s.encode("utf-8")) <= 1000 for s in sents)
    assert "".join(sents[2:]) == LONG_LINE


def test_training_is_deterministic(tmp_path: Path, tok: GLMTokenizer) -> None:
    again = train_sentencepiece([EN, ZH] * 20 + [LONG_LINE], tmp_path / "again", vocab_size=400)
    assert GLMTokenizer(again).fingerprint() == tok.fingerprint()
