"""Shared fixtures: a tiny bilingual corpus, tokenizer and indexed datasets made from inline text."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Tests run on CPU unless a GPU is present (tests/test_gpu.py); set before anything imports DeepSpeed.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # bitwise-reproducible MKL, as glm_train.env sets it

REPO = Path(__file__).resolve().parents[1]

_EN_WORDS = ("the lord god said unto moses and aaron people land of israel king house son father "
             "day night water light earth heaven children went came spake saying behold").split()
_ZH_CHARS = "却说曹操刘备关羽张飞孔明天下大势分久必合合久必分玄德曰吾乃汉室宗亲兵马将军城池"


def _docs(rng: random.Random, n: int, lang: str) -> list[str]:
    docs = []
    for _ in range(n):
        if lang == "en":
            lines = [" ".join(rng.choice(_EN_WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                     for _ in range(rng.randint(5, 12))]
        else:
            lines = ["".join(rng.choice(_ZH_CHARS) for _ in range(rng.randint(8, 20))) + "。"
                     for _ in range(rng.randint(5, 12))]
        docs.append("\n".join(lines))
    return docs


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tokenizer and en/zh train/val datasets; returns Hydra overrides pointing at them."""
    from glm_train.data.indexed import write_indexed_dataset
    from glm_train.data.tokenizer import GLMTokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("tiny_data")
    rng = random.Random(0)
    splits = {"en_train": _docs(rng, 60, "en"), "en_val": _docs(rng, 6, "en"),
              "zh_train": _docs(rng, 60, "zh"), "zh_val": _docs(rng, 6, "zh")}
    model = train_sentencepiece(splits["en_train"] + splits["zh_train"], out / "tok", vocab_size=400)
    tok = GLMTokenizer(model)
    for name, docs in splits.items():
        write_indexed_dataset(out / name, [tok.encode(d) for d in docs], tok.vocab_size, tok.fingerprint())
    return {"tokenizer": str(model), "dir": str(out)}


def data_overrides(d: dict[str, str]) -> list[str]:
    base = d["dir"]
    return [f"data.tokenizer={d['tokenizer']}", f"data.sources=[{{path:{base}/en_train}},{{path:{base}/zh_train}}]",
            f"data.valid={{en:{base}/en_val,zh:{base}/zh_val}}"]
