"""``glm-build-mip``: tokenize prompted datasets into a MIP dataset (SPEC.md, "Data").

Input: one ``.jsonl`` file, or a folder whose ``*.jsonl`` files are separate datasets (named by
file stem, processed in sorted order). Every non-blank line is a JSON object with string fields
``prompt`` and ``target`` (non-empty, not only whitespace); other fields are ignored.

Each dataset is capped at ``--cap`` records (GLM-130B: 100k per T0 dataset, 200k per DeepStruct
dataset). Which records survive is a uniformly random subset drawn with a generator seeded by
``(--seed, dataset name)``, so a dataset's selection does not change when other datasets are added;
kept records stay in file order.

Output: an indexed dataset ``<prefix>.{bin,idx,json}`` (document = prompt tokens + target tokens,
datasets one after another) plus ``<prefix>.mip.npy`` (int32 prompt lengths) and ``<prefix>.mip.json``
(sources with sha256, counts before/after the cap, each dataset's document range, seed, truncation).
Both sidecars are written before the ``<prefix>.json`` marker; read with
:class:`glm_train.data.mip.MIPDataset`.

Invalid records (bad JSON, missing/non-string fields, empty target) abort the build with exit code 1
and ``file:line`` messages before anything is written, and an existing output at the prefix is
invalidated (its marker removed) so nothing looks like the result of this run. ``--skip-bad``
skips and reports them instead.

Caveat: literal special-token strings in the text (e.g. ``"[MASK]"``) become special ids, as in
:meth:`GLMTokenizer.encode`; such records are counted in the metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glm_train.data.indexed import write_indexed_dataset
from glm_train.data.mip import MIP_FORMAT, MIP_VERSION, mip_paths
from glm_train.data.tokenizer import SPECIAL_TOKENS, GLMTokenizer

DEFAULT_CAP = 100_000
_MAX_REPORTED = 20
_BATCH = 2048


class MIPInputError(ValueError):
    """Invalid input records; ``errors`` holds one ``file:line: reason`` message each."""

    def __init__(self, errors: Sequence[str], total: int | None = None) -> None:
        self.errors = list(errors)
        self.total = len(self.errors) if total is None else total
        shown = "\n".join(self.errors[:_MAX_REPORTED])
        more = self.total - min(len(self.errors), _MAX_REPORTED)
        tail = f"\n... and {more} more" if more > 0 else ""
        super().__init__(f"{self.total} invalid record(s):\n{shown}{tail}")


@dataclass
class _Source:
    name: str
    path: Path
    valid_lines: list[int] = field(default_factory=list)  # 1-based line numbers of valid records
    errors: list[str] = field(default_factory=list)
    sha256: str = ""


def _check_record(line: str) -> tuple[dict[str, Any] | None, str]:
    """Parse one line; returns (record, "") or (None, reason)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(rec, dict):
        return None, f"expected a JSON object, got {type(rec).__name__}"
    for key in ("prompt", "target"):
        if key not in rec:
            return None, f"missing field {key!r}"
        if not isinstance(rec[key], str):
            return None, f"field {key!r} must be a string, got {type(rec[key]).__name__}"
    if not rec["target"].strip():
        return None, "empty target"
    return rec, ""


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


def _scan(src: _Source) -> None:
    """Validate every line of one source, remember valid line numbers, hash the file."""
    h = hashlib.sha256()
    for lineno, raw in _lines(src.path):
        h.update(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            src.errors.append(f"{src.path}:{lineno}: not valid UTF-8 ({e.reason})")
            continue
        if not line.strip():
            continue
        rec, why = _check_record(line)
        if rec is None:
            src.errors.append(f"{src.path}:{lineno}: {why}")
        else:
            src.valid_lines.append(lineno)
    src.sha256 = h.hexdigest()


def discover_sources(input_path: str | Path) -> list[tuple[str, Path]]:
    """``(dataset name, file)`` pairs: the file itself, or a folder's ``*.jsonl`` files sorted."""
    p = Path(input_path)
    if p.is_file():
        return [(p.stem, p)]
    if p.is_dir():
        files = sorted(f for f in p.glob("*.jsonl") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no *.jsonl files in {p}")
        return [(f.stem, f) for f in files]
    raise FileNotFoundError(f"input not found: {p}")


def select_indices(n: int, cap: int, seed: int, name: str) -> np.ndarray:
    """Sorted indices of the records kept from a dataset of ``n`` (all if ``n <= cap``)."""
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    # Seeded by the dataset's name too: adding or removing other datasets leaves this one alone.
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_key])
    return np.sort(rng.choice(n, size=cap, replace=False))


def _read_selected(src: _Source, keep_lines: set[int]) -> Iterator[dict[str, Any]]:
    for lineno, raw in _lines(src.path):
        if lineno in keep_lines:
            rec, why = _check_record(raw.decode("utf-8"))
            if rec is None:  # the file changed between the two passes
                raise RuntimeError(f"{src.path}:{lineno}: {why} (file modified during the build?)")
            yield rec


def _invalidate(prefix: Path) -> None:
    """Remove the markers of an existing output so it no longer looks complete."""
    Path(str(prefix) + ".json").unlink(missing_ok=True)
    mip_paths(prefix)[1].unlink(missing_ok=True)


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_mip(
    input_path: str | Path,
    output_prefix: str | Path,
    tokenizer: GLMTokenizer | str | Path,
    cap: int = DEFAULT_CAP,
    seed: int = 1234,
    max_prompt_tokens: int | None = None,
    max_target_tokens: int | None = None,
    skip_bad: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Build a MIP dataset; returns the metadata written to ``<prefix>.mip.json``.

    Raises :class:`MIPInputError` on invalid records unless ``skip_bad`` (then they are reported
    through ``log`` and counted in the metadata).
    """
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    tok = tokenizer if isinstance(tokenizer, GLMTokenizer) else GLMTokenizer(tokenizer)
    prefix = Path(output_prefix)
    if cap <= 0:
        raise ValueError(f"cap must be positive, got {cap}")
    for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_target_tokens", max_target_tokens)):
        if value is not None and value < (0 if name == "max_prompt_tokens" else 1):
            raise ValueError(f"{name} out of range: {value}")

    sources = [_Source(name, path) for name, path in discover_sources(input_path)]
    for src in sources:
        _scan(src)
    errors = [e for src in sources for e in src.errors]
    if errors and not skip_bad:
        _invalidate(prefix)
        raise MIPInputError(errors)
    for e in errors[:_MAX_REPORTED]:
        say(f"skipped {e}")
    if len(errors) > _MAX_REPORTED:
        say(f"skipped {len(errors) - _MAX_REPORTED} more invalid record(s)")

    specials = tuple(SPECIAL_TOKENS)
    datasets: list[dict[str, Any]] = []
    prompt_lengths: list[int] = []
    stats = {"prompt_truncated": 0, "target_truncated": 0, "with_special_strings": 0}
    meta: dict[str, Any] = {}

    def documents() -> Iterator[np.ndarray]:
        start = 0
        for src in sources:
            keep = select_indices(len(src.valid_lines), cap, seed, src.name)
            keep_lines = {src.valid_lines[int(i)] for i in keep}
            info = {"name": src.name, "path": str(src.path), "sha256": src.sha256,
                    "records": len(src.valid_lines) + len(src.errors), "valid": len(src.valid_lines),
                    "skipped": len(src.errors), "kept": len(keep), "prompt_tokens": 0, "target_tokens": 0}
            recs = _read_selected(src, keep_lines)
            while batch := [r for _, r in zip(range(_BATCH), recs)]:
                texts = [t for r in batch for t in (r["prompt"], r["target"])]
                stats["with_special_strings"] += sum(
                    any(s in r["prompt"] or s in r["target"] for s in specials) for r in batch
                )
                enc = tok.encode_batch(texts)
                for prompt, target in zip(enc[0::2], enc[1::2]):
                    if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
                        # Keep the end of the prompt: the instruction/"Answer:" sits next to the answer.
                        prompt = prompt[len(prompt) - max_prompt_tokens :]
                        stats["prompt_truncated"] += 1
                    if max_target_tokens is not None and len(target) > max_target_tokens:
                        target = target[:max_target_tokens]
                        stats["target_truncated"] += 1
                    prompt_lengths.append(len(prompt))
                    info["prompt_tokens"] += len(prompt)
                    info["target_tokens"] += len(target)
                    yield np.asarray(prompt + target, dtype=np.int64)
            info["doc_range"] = [start, start + info["kept"]]
            start += info["kept"]
            datasets.append(info)
            say(f"{src.name}: {info['records']} records, {info['skipped']} skipped, kept {info['kept']}, "
                f"{info['prompt_tokens']} prompt + {info['target_tokens']} target tokens")
        # write_indexed_dataset consumes every document before it writes its .json marker (the
        # marker records n_docs), so the sidecars written here always land before the marker.
        meta.update({
            "format": MIP_FORMAT, "version": MIP_VERSION,
            "n_docs": len(prompt_lengths), "n_tokens": sum(d["prompt_tokens"] + d["target_tokens"]
                                                           for d in datasets),
            "cap": cap, "seed": seed, "max_prompt_tokens": max_prompt_tokens,
            "max_target_tokens": max_target_tokens, "skip_bad": skip_bad, **stats,
            "tokenizer": str(tok.path), "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size, "datasets": datasets,
        })
        npy_path, json_path = mip_paths(prefix)
        lengths = np.asarray(prompt_lengths, dtype=np.int32)
        _atomic_write(npy_path, lambda f: np.save(f, lengths))
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        _atomic_write(json_path, lambda f: f.write(text.encode("utf-8")))

    prefix.parent.mkdir(parents=True, exist_ok=True)
    # write_indexed_dataset removes the old marker before reading the first document.
    write_indexed_dataset(prefix, documents(), tok.vocab_size, tok.fingerprint())
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 on invalid input)."""
    parser = argparse.ArgumentParser(
        prog="glm-build-mip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="a .jsonl file, or a folder of .jsonl datasets")
    parser.add_argument("--output-prefix", required=True, help="output path prefix (writes .bin/.idx/.json/.mip.*)")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    parser.add_argument("--cap", type=int, default=DEFAULT_CAP,
                        help=f"max records kept per dataset (default {DEFAULT_CAP})")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the capped subset (default 1234)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="cut longer prompts from the left (keeps the end next to the answer)")
    parser.add_argument("--max-target-tokens", type=int, default=None, help="cut longer targets from the right")
    parser.add_argument("--skip-bad", action="store_true", help="skip and report invalid records")
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[build_mip] {msg}", file=sys.stderr, flush=True)

    try:
        meta = build_mip(args.input, args.output_prefix, args.tokenizer, cap=args.cap, seed=args.seed,
                         max_prompt_tokens=args.max_prompt_tokens, max_target_tokens=args.max_target_tokens,
                         skip_bad=args.skip_bad, log=log)
    except MIPInputError as e:
        log(f"error: {e}\nnothing written, any earlier output at the prefix invalidated (--skip-bad skips invalid records)")
        return 1
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log(f"error: {e}")
        return 1
    log(f"wrote {args.output_prefix}: {meta['n_docs']} documents, {meta['n_tokens']} tokens "
        f"({meta['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
