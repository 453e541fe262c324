"""``glm-preprocess``: tokenize jsonl / plain-text corpora into the indexed format.

Pipeline (see :mod:`glm_train.data.indexed` for the output format):

1. **Plan** (parent): one vectorised newline scan per input file cuts the
   documents into *shards* of ``--shard-docs`` documents (the unit of
   resumption) and each shard into *tasks* of at most ``--batch-docs``
   documents (the unit of parallel work). A task is a list of byte ranges.
2. **Tokenize** (workers): each worker reads its byte ranges itself, decodes
   and validates the documents and encodes them with one batched
   sentencepiece call (numpy output, one thread per worker process: ``--workers``
   is the number of cores used). The tokenizer is inherited through ``fork``.
3. **Write** (parent): results arrive in task order and are appended to the
   shard's temp files; a finished shard is renamed into
   ``<prefix>.shards/shard_NNNNNN.{bin,lens.npy,json}``, its ``.json`` last.
   The json records the shard's input fingerprint (byte ranges + file
   size/mtime + options + tokenizer), so a rerun with the same arguments
   reuses finished shards and only tokenizes the rest.
4. **Assemble**: :func:`assemble_shards` streams the shards into
   ``<prefix>.{bin,idx,json}`` (temp names, renamed; ``.json`` last), writes
   ``<prefix>.report.json`` and removes the shards folder.

Input formats (``--format auto`` picks by extension): ``jsonl`` (``.jsonl``,
``.ndjson``, ``.json``; one JSON object per line, text in ``--text-field``),
plain text (anything else; the whole file is one document, or one document per
line with ``--text-per-line``, where a trailing ``"\\r"`` is dropped). A UTF-8
BOM at the start of a file is dropped.

Bad input (invalid JSON, not an object, non-UTF-8 bytes, missing or
non-string text field, text that is not valid Unicode, empty document unless
``--keep-empty``) fails the run with exit code 1 and ``file:line: reason``;
``--skip-bad`` skips such lines and reports them instead. The final
``<prefix>.json`` marker is removed when a run starts and only written at
the very end, so a killed or failed run never leaves output that looks
complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glm_train.data.indexed import FORMAT_VERSION, dtype_for_vocab
from glm_train.data.tokenizer import SPECIAL_TOKENS, GLMTokenizer

SHARD_FORMAT = 1
MAX_REPORTED_BAD = 20
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
# Test-only hook: SIGKILL the parent after this many shards were finished in
# the current run (simulates a crash between shards).
KILL_ENV = "GLM_PREPROCESS_TEST_KILL_AFTER_SHARDS"
_SCAN_CHUNK = 8 << 20
_COPY_CHUNK = 16 << 20


class PreprocessError(Exception):
    """A user-facing failure (bad input, unusable arguments); exit code 1."""


# ----------------------------------------------------------------- planning


@dataclass(frozen=True)
class InputFile:
    """One input file and the fingerprint its shards are validated against."""

    path: str
    kind: str  # "jsonl" | "lines" | "whole"
    size: int
    mtime_ns: int


# (file index, start byte, end byte, 1-based first line, number of documents)
Piece = tuple[int, int, int, int, int]


@dataclass
class Shard:
    """Documents ``[start_doc, start_doc + n_docs)`` split into tasks of pieces."""

    index: int
    start_doc: int
    n_docs: int = 0
    tasks: list[list[Piece]] = field(default_factory=list)

    @property
    def pieces(self) -> list[Piece]:
        return [p for t in self.tasks for p in t]


def input_kind(path: str | Path, fmt: str, text_per_line: bool) -> str:
    """``jsonl``, ``lines`` (one document per line) or ``whole`` (one per file)."""
    if fmt == "jsonl" or (fmt == "auto" and str(path).lower().endswith(JSONL_SUFFIXES)):
        return "jsonl"
    return "lines" if text_per_line else "whole"


def _next_cut(c: int, shard_docs: int, batch_docs: int) -> int:
    """Smallest global document index > ``c`` that starts a task."""
    r = c % shard_docs
    base = c - r
    return min(base + (r // batch_docs + 1) * batch_docs, base + shard_docs)


def _line_boundaries(
    path: str, size: int, first_global: int, shard_docs: int, batch_docs: int
) -> tuple[int, list[tuple[int, int]]]:
    """Count the lines of a file and find the byte offsets of the lines that start a task.

    Returns ``(n_lines, [(local_line_index, byte_offset), ...])``; line 0 at
    byte 0 is always included. Task starts depend only on the global document
    index, so one sequential scan suffices.
    """
    if size == 0:
        return 0, []
    cuts = [(0, 0)]
    nxt = _next_cut(first_global, shard_docs, batch_docs) - first_global
    newlines = 0
    last_byte = b""
    buf = bytearray(_SCAN_CHUNK)
    pos = 0
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            view = np.frombuffer(buf, dtype=np.uint8, count=n)
            nl = np.flatnonzero(view == 10)
            # Line ``newlines + k + 1`` starts right after the k-th newline here.
            while nxt <= newlines + len(nl):
                start = pos + int(nl[nxt - newlines - 1]) + 1
                if start >= size:  # the final newline does not start a line
                    break
                cuts.append((nxt, start))
                nxt = _next_cut(first_global + nxt, shard_docs, batch_docs) - first_global
            newlines += len(nl)
            last_byte = bytes(buf[n - 1 : n])
            pos += n
    if pos != size:
        raise PreprocessError(f"{path}: file changed while being scanned")
    n_lines = newlines + (0 if last_byte == b"\n" else 1)
    return n_lines, cuts


def plan_shards(files: Sequence[InputFile], shard_docs: int, batch_docs: int) -> list[Shard]:
    """Cut all documents into shards of ``shard_docs`` and tasks of ``<= batch_docs``."""
    if shard_docs < 1 or batch_docs < 1:
        raise ValueError("shard_docs and batch_docs must be positive")
    shards: list[Shard] = []
    task_key: tuple[int, int] | None = None
    g = 0  # global index of the next document
    for fi, f in enumerate(files):
        if f.kind == "whole":
            n_docs, cuts = 1, [(0, 0)]
        else:
            n_docs, cuts = _line_boundaries(f.path, f.size, g, shard_docs, batch_docs)
        bounds = cuts + [(n_docs, f.size)]
        for (i0, b0), (i1, b1) in zip(bounds, bounds[1:]):
            if i1 == i0:
                continue
            c = g + i0
            key = (c // shard_docs, (c % shard_docs) // batch_docs)
            if not shards or shards[-1].index != key[0]:
                shards.append(Shard(index=key[0], start_doc=c))
            shard = shards[-1]
            if key != task_key:
                shard.tasks.append([])
                task_key = key
            shard.tasks[-1].append((fi, b0, b1, i0 + 1, i1 - i0))
            shard.n_docs += i1 - i0
        g += n_docs
    return shards


# ------------------------------------------------------------ worker side


@dataclass
class TaskResult:
    """What a worker sends back for one task."""

    lengths: np.ndarray
    tokens: np.ndarray
    bad: list[tuple[int, int, str]]  # (file index, line, reason)
    n_bad: int
    fatal: str | None = None


_STATE: dict[str, Any] = {}
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True)))


def _init_worker(state: dict[str, Any], parent_pid: int) -> None:
    _STATE.update(state)
    # Pool workers blocked on their queue would outlive a SIGKILLed parent;
    # ask the kernel to kill them with it (Linux only; best effort).
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def _read_range(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise PreprocessError(f"{path}: file shrank while being read")
    return data


def _decode_error(e: UnicodeDecodeError) -> str:
    return f"invalid UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1})"


def _piece_docs(
    files: Sequence[InputFile],
    piece: Piece,
    opts: dict[str, Any],
    texts: list[str],
    where: list[tuple[int, int]],
    bad: list[tuple[int, int, str]],
) -> None:
    """Append the piece's good documents to ``texts`` (and their file/line to ``where``)."""
    fi, start, end, line0, n_docs = piece
    f = files[fi]
    data = _read_range(f.path, start, end)
    bom = start == 0 and data.startswith(b"\xef\xbb\xbf")
    if bom:
        data = data[3:]
    if f.kind == "whole":
        try:
            raw: list[str | bytes] = [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            bad.append((fi, line, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col})"))
            return
    else:
        if data.endswith(b"\n"):
            data = data[:-1]
        try:
            # Fast path: decode the whole range once, then split.
            raw = data.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            raw = data.split(b"\n")  # decoded (and located) line by line below
        if len(raw) != n_docs:
            raise PreprocessError(f"{f.path}: file changed while being read")
    field_name, keep_empty = opts["text_field"], opts["keep_empty"]
    for k, item in enumerate(raw):
        line = line0 + k
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((fi, line, _decode_error(e)))
                continue
        if f.kind == "jsonl":
            try:
                obj = json.loads(item)
            except json.JSONDecodeError as e:
                what = "blank line" if not item.strip() else f"{e.msg} at column {e.colno}"
                bad.append((fi, line, f"invalid JSON: {what}"))
                continue
            if not isinstance(obj, dict):
                bad.append((fi, line, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            if field_name not in obj:
                bad.append((fi, line, f"missing field {field_name!r}"))
                continue
            text = obj[field_name]
            if not isinstance(text, str):
                bad.append((fi, line, f"field {field_name!r} is {type(text).__name__}, not a string"))
                continue
        elif f.kind == "lines":
            text = item[:-1] if item.endswith("\r") else item
        else:
            text = item
        if not text and not keep_empty:
            bad.append((fi, line, "empty document (use --keep-empty to keep it)"))
            continue
        texts.append(text)
        where.append((fi, line))


def _encode(tok: GLMTokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token arrays equal to ``tok.encode(t)`` for every text."""
    out: list[np.ndarray | None] = [None] * len(texts)
    plain_idx: list[int] = []
    for i, t in enumerate(texts):
        # Cheap membership tests first: the regex only runs on candidates.
        if ("[" in t or "<" in t) and _SPECIAL_RE.search(t):
            out[i] = np.asarray(tok.encode(t), dtype=np.int32)
        elif t:
            plain_idx.append(i)
        else:
            out[i] = np.zeros(0, dtype=np.int32)
    if plain_idx:
        plain = [texts[i] for i in plain_idx]
        # num_threads=1: parallelism comes from the worker processes; numpy
        # output skips building a Python int per token (sentencepiece>=0.2.1).
        try:
            arrays = tok.sp.encode(plain, num_threads=1, return_type="numpy")
        except (ValueError, TypeError) as e:
            if "return_type" not in str(e) and "unexpected keyword" not in str(e):
                raise
            arrays = [np.asarray(ids, dtype=np.int32) for ids in tok.sp.encode(plain, num_threads=1)]
        for i, a in zip(plain_idx, arrays):
            out[i] = a
    return out  # type: ignore[return-value]


def _run_task(pieces: list[Piece]) -> TaskResult:
    """Tokenize one task (worker entry point)."""
    st = _STATE
    files: list[InputFile] = st["files"]
    opts: dict[str, Any] = st["opts"]
    tok: GLMTokenizer = st["tokenizer"]
    texts: list[str] = []
    where: list[tuple[int, int]] = []
    bad: list[tuple[int, int, str]] = []
    for piece in pieces:
        _piece_docs(files, piece, opts, texts, where, bad)
        if bad and not opts["skip_bad"]:
            break
    if not bad or opts["skip_bad"]:
        try:
            arrays = _encode(tok, texts)
        except (TypeError, RuntimeError, UnicodeError):
            # Lone surrogates (from JSON "\\ud800" escapes) cannot go to C++;
            # find them one by one and treat them like any other bad line.
            keep = []
            for i, t in enumerate(texts):
                try:
                    t.encode("utf-8")
                    keep.append(i)
                except UnicodeEncodeError as e:
                    bad.append(
                        (*where[i], f"text is not valid Unicode (lone surrogate at character {e.start + 1})")
                    )
            bad.sort()
            texts = [texts[i] for i in keep]
            arrays = _encode(tok, texts) if (not bad or opts["skip_bad"]) else []
    if bad and not opts["skip_bad"]:
        fi, line, reason = min(bad)
        empty = np.zeros(0, dtype=np.int64)
        return TaskResult(empty, empty, [], 0, fatal=f"{files[fi].path}:{line}: {reason}")
    dtype = st["dtype"]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)
    if tokens.size and int(tokens.max()) >= st["vocab_size"]:
        raise RuntimeError(f"token id {int(tokens.max())} >= vocab size {st['vocab_size']}")
    return TaskResult(lengths, tokens, bad[:MAX_REPORTED_BAD], len(bad))


# ------------------------------------------------------------ shard files


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _shard_paths(shards_dir: Path, index: int) -> tuple[Path, Path, Path]:
    stem = shards_dir / f"shard_{index:06d}"
    return Path(f"{stem}.bin"), Path(f"{stem}.lens.npy"), Path(f"{stem}.json")


def shard_spec(shard: Shard, files: Sequence[InputFile], opts: dict[str, Any]) -> dict[str, Any]:
    """JSON-native fingerprint of everything a shard's content depends on."""
    pieces = []
    for fi, start, end, line0, n in shard.pieces:
        f = files[fi]
        pieces.append([f.path, f.size, f.mtime_ns, f.kind, start, end, line0, n])
    return {"shard_format": SHARD_FORMAT, "index": shard.index, "pieces": pieces, **opts}


def _load_valid_shard(
    shards_dir: Path, index: int, spec: dict[str, Any], itemsize: int
) -> dict[str, Any] | None:
    """The shard's marker if its files are complete and match ``spec``; else None."""
    bin_path, lens_path, json_path = _shard_paths(shards_dir, index)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta.get("spec") != spec:
            return None
        lens = np.load(lens_path, allow_pickle=False)
        if lens.shape != (meta["n_docs"],) or int(lens.sum()) != meta["n_tokens"]:
            return None
        if bin_path.stat().st_size != meta["n_tokens"] * itemsize:
            return None
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


class _ShardWriter:
    """Appends task results to a shard's temp files and publishes it when done."""

    def __init__(
        self, shards_dir: Path, index: int, spec: dict[str, Any], files: Sequence[InputFile]
    ) -> None:
        self.paths = _shard_paths(shards_dir, index)
        self.tag = f".tmp.{os.getpid()}"
        self.tmp = [Path(str(p) + self.tag) for p in self.paths]
        self.spec, self.files = spec, files
        self.bin = open(self.tmp[0], "wb")  # closed in finish()/abort()
        self.lengths: list[np.ndarray] = []
        self.bad: list[tuple[int, int, str]] = []
        self.n_bad = 0
        self.n_tokens = 0

    def add(self, r: TaskResult) -> None:
        r.tokens.tofile(self.bin)
        self.lengths.append(r.lengths)
        self.n_tokens += int(r.tokens.size)
        self.n_bad += r.n_bad
        self.bad.extend(r.bad[: MAX_REPORTED_BAD - len(self.bad)])

    def finish(self) -> dict[str, Any]:
        self.bin.close()
        lens = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        with open(self.tmp[1], "wb") as f:
            np.save(f, lens.astype(np.int64, copy=False))
        meta = {
            "spec": self.spec,
            "n_docs": int(lens.size),
            "n_tokens": self.n_tokens,
            "n_bad": self.n_bad,
            "bad": [[self.files[fi].path, line, reason] for fi, line, reason in self.bad],
        }
        self.tmp[2].write_text(json.dumps(meta) + "\n", encoding="utf-8")
        # The marker goes last: a shard without its .json is never reused.
        for t, p in zip(self.tmp, self.paths):
            os.replace(t, p)
        return meta

    def abort(self) -> None:
        self.bin.close()
        for t in self.tmp:
            t.unlink(missing_ok=True)


def assemble_shards(
    shard_prefixes: Sequence[str | Path],
    prefix: str | Path,
    vocab_size: int,
    tokenizer_fingerprint: str,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Concatenate finished shards into ``prefix.{bin,idx,json}`` in bounded memory.

    Each shard prefix names ``<p>.bin`` (tokens) and ``<p>.lens.npy`` (int64
    document lengths). Files are written under temp names and renamed, the
    ``.json`` marker last (after the optional ``prefix.report.json``), exactly
    as :func:`glm_train.data.indexed.write_indexed_dataset` would lay them out.
    Returns the metadata written.
    """
    dtype = dtype_for_vocab(vocab_size)
    bin_path, idx_path, json_path = (Path(f"{prefix}{s}") for s in (".bin", ".idx", ".json"))
    report_path = Path(f"{prefix}.report.json")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.unlink(missing_ok=True)
    tag = f".tmp.{os.getpid()}"
    tmp_bin, tmp_idx, tmp_json = (Path(str(p) + tag) for p in (bin_path, idx_path, json_path))
    try:
        n_docs = 0
        for sp in shard_prefixes:
            n_docs += int(np.load(f"{sp}.lens.npy", mmap_mode="r").shape[0])
        offsets = np.lib.format.open_memmap(tmp_idx, mode="w+", dtype=np.int64, shape=(n_docs + 1,))
        offsets[0] = 0
        d = t = 0
        with open(tmp_bin, "wb") as out:
            for sp in shard_prefixes:
                lens = np.load(f"{sp}.lens.npy", allow_pickle=False)
                np.cumsum(lens, out=offsets[d + 1 : d + 1 + lens.size])
                offsets[d + 1 : d + 1 + lens.size] += t
                d += lens.size
                t += int(lens.sum())
                with open(f"{sp}.bin", "rb") as src:
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
            size = out.tell()
        offsets.flush()
        del offsets
        if size != t * dtype.itemsize:
            raise RuntimeError(f"shard token files hold {size} bytes, expected {t * dtype.itemsize}")
        meta = {
            "format": "glm_train.indexed",
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "n_docs": n_docs,
            "n_tokens": t,
            "vocab_size": int(vocab_size),
            "tokenizer_fingerprint": tokenizer_fingerprint,
        }
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        if report is not None:
            _atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp_json, json_path)
        return meta
    finally:
        for p in (tmp_bin, tmp_idx, tmp_json):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ driver


def _iter_results(tasks: list[list[Piece]], workers: int, state: dict[str, Any]) -> Iterator[TaskResult]:
    """Task results in task order, computed in-process or by a fork pool."""
    if workers <= 1 or len(tasks) <= 1:
        _STATE.update(state)
        for t in tasks:
            yield _run_task(t)
        return
    methods = mp.get_all_start_methods()
    # fork: workers inherit the loaded tokenizer instead of unpickling it.
    ctx = mp.get_context("fork" if "fork" in methods else None)
    ex = ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(state, os.getpid())
    )
    window: deque[Future[TaskResult]] = deque()
    it = iter(tasks)
    try:
        # A bounded window keeps every worker busy without queueing all results.
        for t in it:
            window.append(ex.submit(_run_task, t))
            if len(window) >= 3 * workers:
                break
        while window:
            r = window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(ex.submit(_run_task, nxt))
            yield r
        ex.shutdown(wait=True)
    finally:
        for fut in window:
            fut.cancel()
        ex.shutdown(wait=False, cancel_futures=True)


def _progress(total: int, initial: int, quiet: bool) -> Any:
    from tqdm import tqdm

    # No monitor thread: worker processes are forked after the bar exists.
    tqdm.monitor_interval = 0
    return tqdm(
        total=total,
        initial=initial,
        unit="doc",
        file=sys.stderr,
        disable=quiet,
        mininterval=0.5,
        dynamic_ncols=True,
        desc="tokenize",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole pipeline; returns the report (also written next to the output)."""
    t0 = time.perf_counter()
    if args.workers < 1 or args.batch_docs < 1 or args.shard_docs < 1:
        raise PreprocessError("--workers, --batch-docs and --shard-docs must be >= 1")
    files = []
    for p in args.input:
        path = Path(p)
        if not path.is_file():
            raise PreprocessError(f"input not found: {p}")
        st = path.stat()
        files.append(
            InputFile(
                str(path.resolve()),
                input_kind(path, args.format, args.text_per_line),
                st.st_size,
                st.st_mtime_ns,
            )
        )
    try:
        tok = GLMTokenizer(args.tokenizer)
    except (OSError, RuntimeError) as e:
        raise PreprocessError(f"cannot load tokenizer {args.tokenizer}: {e}") from e
    vocab_size, fingerprint = tok.vocab_size, tok.fingerprint()
    dtype = dtype_for_vocab(vocab_size)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # From here on the old output must not look complete.
    Path(f"{prefix}.json").unlink(missing_ok=True)
    Path(f"{prefix}.report.json").unlink(missing_ok=True)

    shards_dir = Path(f"{prefix}.shards")
    shards_dir.mkdir(exist_ok=True)
    # Two runs on one prefix would interleave shard files; the lock is held until run() ends.
    lock = open(shards_dir / "LOCK", "w")
    try:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    except OSError as e:
        lock.close()
        raise PreprocessError(f"another glm-preprocess is writing {prefix} ({shards_dir}/LOCK)") from e

    try:
        opts = {
            "text_field": args.text_field,
            "keep_empty": args.keep_empty,
            "tokenizer_fingerprint": fingerprint,
            "dtype": dtype.name,
        }
        shards = plan_shards(files, args.shard_docs, args.batch_docs)
        total_docs = sum(s.n_docs for s in shards)

        done: dict[int, dict[str, Any]] = {}
        specs = {}
        for s in shards:
            specs[s.index] = shard_spec(s, files, opts)
            meta = _load_valid_shard(shards_dir, s.index, specs[s.index], dtype.itemsize)
            if meta is not None:
                done[s.index] = meta
        keep = {p.name for i in done for p in _shard_paths(shards_dir, i)} | {"LOCK"}
        for p in shards_dir.iterdir():  # temp files and stale/invalid shards
            if p.name not in keep:
                p.unlink()
        todo = [s for s in shards if s.index not in done]
        reused_docs = sum(s.n_docs for s in shards if s.index in done)
        if done:
            print(f"glm-preprocess: resuming: {len(done)}/{len(shards)} shards already done", file=sys.stderr)

        state = {
            "files": files,
            "opts": {**opts, "skip_bad": args.skip_bad},
            "tokenizer": tok,
            "dtype": dtype,
            "vocab_size": vocab_size,
        }
        tasks = [t for s in todo for t in s.tasks]
        kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
        n_tokens_run = 0
        bar = _progress(total_docs, reused_docs, args.quiet)
        t_start = time.perf_counter()
        writer: _ShardWriter | None = None
        results = _iter_results(tasks, args.workers, state)
        try:
            finished = 0
            for s in todo:
                writer = _ShardWriter(shards_dir, s.index, specs[s.index], files)
                for _ in s.tasks:
                    r = next(results)
                    if r.fatal is not None:
                        raise PreprocessError(r.fatal + "  (use --skip-bad to skip bad lines)")
                    writer.add(r)
                    n_tokens_run += int(r.tokens.size)
                    bar.update(int(r.lengths.size) + r.n_bad)
                    rate = n_tokens_run / max(time.perf_counter() - t_start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
                done[s.index] = writer.finish()
                writer = None
                finished += 1
                if kill_after and finished >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            results.close()  # shuts the worker pool down, also on errors
            if writer is not None:
                writer.abort()
            bar.close()

        metas = [done[s.index] for s in shards]
        bad = [b for m in metas for b in m["bad"]][:MAX_REPORTED_BAD]
        n_bad = sum(m["n_bad"] for m in metas)
        elapsed = time.perf_counter() - t0
        report = {
            "output_prefix": str(prefix),
            "inputs": [f.path for f in files],
            "n_lines": total_docs,
            "n_docs": sum(m["n_docs"] for m in metas),
            "n_tokens": sum(m["n_tokens"] for m in metas),
            "n_bad": n_bad,
            "bad": [{"file": f, "line": line, "reason": reason} for f, line, reason in bad],
            "bad_truncated": n_bad > len(bad),
            "shards": len(shards),
            "shards_reused": len(shards) - len(todo),
            "workers": args.workers,
            "elapsed_s": round(elapsed, 3),
        }
        prefixes = [_shard_paths(shards_dir, s.index)[0].with_suffix("") for s in shards]
        assemble_shards(prefixes, prefix, vocab_size, fingerprint, report)
    finally:
        lock.close()
    shutil.rmtree(shards_dir, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    """The ``glm-preprocess`` command line."""
    p = argparse.ArgumentParser(
        prog="glm-preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", nargs="+", required=True, help="jsonl or plain-text files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.{bin,idx,json,report.json}")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text (default: text)")
    p.add_argument(
        "--format",
        choices=("auto", "jsonl", "text"),
        default="auto",
        help="input format; auto: .jsonl/.ndjson/.json are jsonl, the rest plain text",
    )
    p.add_argument("--text-per-line", action="store_true", help="plain text: one document per line")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (= cores used)")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per worker task")
    p.add_argument("--shard-docs", type=int, default=100_000, help="documents per resumable shard")
    p.add_argument("--skip-bad", action="store_true", help="skip bad lines and report them")
    p.add_argument("--keep-empty", action="store_true", help="keep empty documents (zero-length)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; exit code 0 on success, 1 on failure."""
    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except PreprocessError as e:
        print(f"glm-preprocess: error: {e}", file=sys.stderr)
        print(f"glm-preprocess: no complete output written at {args.output_prefix}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("glm-preprocess: interrupted; rerun with the same arguments to resume", file=sys.stderr)
        return 130
    n_bad = report["n_bad"]
    print(
        f"glm-preprocess: wrote {report['n_docs']} docs, {report['n_tokens']} tokens to "
        f"{args.output_prefix} in {report['elapsed_s']:.1f}s "
        f"({report['shards_reused']}/{report['shards']} shards reused)",
        file=sys.stderr,
    )
    if n_bad:
        lines = ", ".join(f"{Path(b['file']).name}:{b['line']}" for b in report["bad"])
        more = f" (first {len(report['bad'])}: {lines})"
        print(
            f"glm-preprocess: skipped {n_bad} bad lines{more}; see {args.output_prefix}.report.json",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
