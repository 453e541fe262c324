"""The training loop: data -> DeepSpeed pipeline engine -> metrics, evaluation, checkpoints.

State that defines "where we are" is tiny on purpose: (step, consumed_samples, elapsed_s) plus the
RNG states. The data order is a pure function of (seed, sample index), so resuming needs nothing
else from the data side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from glm_train.config import GLMConfig, PositionEncoding, Precision, SourceKind, from_yaml, to_yaml
from glm_train.data.blank_infilling import SpecialIds
from glm_train.data.dataset import GLMTrainData, ValidationSet, collate
from glm_train.data.indexed import IndexedDataset, check_fingerprint
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.train.checkpoint import CheckpointManager
from glm_train.train.engine import build_engine, data_parallel_size, set_lr
from glm_train.train.flops import hardware_flops_per_token, model_flops_per_token, recomputes
from glm_train.train.guard import SpikeGuard, UpdateGate, Verdict, batch_loss_and_norm
from glm_train.train.metrics import MetricsWriter, plot_losses
from glm_train.train.schedules import (
    EGSSchedule,
    global_batch_at,
    lr_at,
    samples_before_step,
    uses_sample_schedule,
)
from glm_train.train.timers import InstructionTimers


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    """Position in the sample stream: samples read so far, including those of skipped updates and
    the ranges jumped over after a rollback."""
    elapsed_s: float = 0.0
    skipped_ranges: list[list[int]] = field(default_factory=list)
    """[start, end) stream positions never to be read again (the data of rolled-back spikes)."""
    lr_scale: float = 1.0
    """Product of stability.guard.lr_factor over the rollbacks so far."""
    egs_override: float | None = None
    """EGS alpha set by a rollback (stability.guard.egs_alpha); None follows the schedule."""
    guard_skips: int = 0
    """Updates the spike guard refused."""
    rollbacks: int = 0


def next_position(pos: int, skipped: list[list[int]]) -> int:
    """The first stream position at or after ``pos`` outside every skipped range."""
    moved = True
    while moved:
        moved = False
        for a, b in skipped:
            if a <= pos < b:
                pos, moved = b, True
    return pos


def special_ids(tok: GLMTokenizer) -> SpecialIds:
    return SpecialIds(mask=tok.mask_id, gmask=tok.gmask_id, sop=tok.sop_id, eop=tok.eop_id, pad=tok.pad_id,
                      eod=tok.eod_id)


def resolve_vocab(cfg: GLMConfig, tok: GLMTokenizer) -> None:
    """Set model.vocab_size from the tokenizer, or check that an explicit one can hold it."""
    padded = tok.padded_vocab_size(cfg.model.pad_vocab_multiple)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = padded
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} ids ({cfg.data.tokenizer}): tokenizer and model do not match")


def rng_state() -> dict[str, Any]:
    """This rank's random state: python, numpy, torch CPU and CUDA (TP-sharded dropout derives from it).

    Only tuples, numbers, strings and tensors, so it loads with ``torch.load(weights_only=True)``.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Runs ``cfg.train.iters`` optimizer steps, resuming from the run dir's latest checkpoint."""

    def __init__(self, cfg: GLMConfig, backend: str) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.tokenizer = GLMTokenizer(cfg.data.tokenizer)
        resolve_vocab(cfg, self.tokenizer)
        self.ids = special_ids(self.tokenizer)
        two_d = PositionEncoding(cfg.model.position_encoding) == PositionEncoding.rope_2d
        sources = []
        for src in cfg.data.sources:
            if src.kind == SourceKind.mip:
                from glm_train.data.mip import MIPDataset

                mip = MIPDataset(src.path)
                check_fingerprint(mip.indexed, self.tokenizer)
                sources.append(("mip", mip))
            else:
                ds = IndexedDataset(src.path)
                check_fingerprint(ds, self.tokenizer)
                sources.append(("lm", ds))
        valid_sets = {name: IndexedDataset(p) for name, p in cfg.data.valid.items()}
        for ds in valid_sets.values():
            check_fingerprint(ds, self.tokenizer)
        weights = None if cfg.data.sources[0].weight is None else [s.weight for s in cfg.data.sources]
        self.data_fingerprint = self._data_fingerprint(sources)
        cache = cfg.data.index_cache or str(Path(cfg.data.sources[0].path).parent / ".glm_index")
        self.data = GLMTrainData(sources, self.ids, cfg.model.seq_length, cfg.train.seed, cfg.objective,
                                 weights, two_d, cache_dir=cache,
                                 cache_key=json.dumps(self.data_fingerprint, sort_keys=True))
        self.valid = {name: ValidationSet(ds, self.ids, cfg.model.seq_length, cfg.eval.gmask_ratio,
                                          cfg.eval.max_samples, two_d) for name, ds in valid_sets.items()}
        seed_everything(cfg.train.seed)
        self.engine, self.par = build_engine(cfg, backend)
        self.rank = dist.get_rank()
        self.dp = data_parallel_size(cfg)
        self.dp_rank = self.par.get_data_parallel_rank()
        self.egs = EGSSchedule(cfg.stability.egs)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.engine, cfg.checkpoint.keep_last,
                                      cfg.checkpoint.keep_every)
        self.state = TrainState()
        self.guard = SpikeGuard(cfg.stability.guard)
        self.gate = UpdateGate(self.engine)
        self.timers = InstructionTimers(self.engine) if cfg.run.timers else None
        self.loss_fn = getattr(self.engine.module, "loss_fn", None)
        c = cfg.debug.corrupt_steps
        self.corrupt = None if c is None else (samples_before_step(c[0], cfg.train),
                                               samples_before_step(c[1] + 1, cfg.train))
        self._step_starts: dict[int, int] = {}
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.rank == 0)
        self._wandb: Any = None

    def _data_fingerprint(self, sources: list[tuple[str, Any]]) -> dict[str, Any]:
        """What the sample order depends on: resuming under a different one would silently change it."""
        cfg = self.cfg
        srcs = []
        for src, (_, obj) in zip(cfg.data.sources, sources):
            ds = obj.indexed if src.kind == SourceKind.mip else obj
            srcs.append({"path": src.path, "kind": src.kind.value, "weight": src.weight, "docs": len(ds),
                         "tokens": int(ds.n_tokens)})
        return {"tokenizer": self.tokenizer.fingerprint(), "seed": cfg.train.seed,
                "seq_length": cfg.model.seq_length, "objective": dataclasses.asdict(cfg.objective),
                "sources": srcs}

    # ------------------------------------------------------------------ set-up and resume
    def _prepare_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if cfg_path.exists() and self.ckpt.latest() is not None:
                old = from_yaml(cfg_path)
                if old.model != self.cfg.model:
                    raise ValueError(f"{self.run_dir}: the model config differs from the run's config.yaml; "
                                     "use a new run.dir (or the saved config) to resume")
            tmp = cfg_path.with_suffix(".yaml.tmp")
            tmp.write_text(to_yaml(self.cfg))
            os.replace(tmp, cfg_path)
        dist.barrier()

    def _record(self, event: dict[str, Any]) -> None:
        """Append ``event`` to the run manifest (rank 0)."""
        if self.rank != 0:
            return
        from omegaconf import OmegaConf

        from glm_train.train.manifest import update_manifest

        cfg = self.cfg
        layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": self.dp, "world_size": dist.get_world_size(),
                  "zero_stage": cfg.parallel.zero_stage, "precision": cfg.precision.value,
                  "backend": dist.get_backend(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
        update_manifest(self.run_dir, config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
                        layout=layout, data_fingerprint=self.data_fingerprint, event=event)

    def _resume(self) -> str | None:
        """Restore the latest (or checkpoint.load) checkpoint; returns its folder, None on a fresh start."""
        from glm_train.convert.export import is_export
        from glm_train.convert.reshard import is_layout_free

        own_latest = self.ckpt.latest()
        load = self.cfg.checkpoint.load
        if load and is_layout_free(load) and own_latest is None:
            return self._load_layout_free(load)
        if load and is_export(load) and own_latest is None:
            return self._init_from_export(load)
        target = load or own_latest
        loaded = self.ckpt.load(load if load and not is_layout_free(load) else None)
        if loaded is None:
            self.metrics.truncate_after(-1)
            return None
        client, rank_state = loaded
        self._restore_client(client)
        set_rng_state(rank_state["rng"])
        self.metrics.truncate_after(self.state.step)
        if self.rank == 0:
            print(f"resumed from step {self.state.step} ({self.state.consumed_samples} samples)", flush=True)
        return str(target)

    def _restore_client(self, client: dict[str, Any]) -> None:
        """Trainer and guard state from a checkpoint's client state, after checking its data fingerprint."""
        saved = client.get("data_fingerprint")
        if saved is not None and saved != self.data_fingerprint:
            diff = [k for k in self.data_fingerprint if saved.get(k) != self.data_fingerprint[k]]
            if not self.cfg.data.allow_change:
                raise ValueError(f"the data config differs from the checkpoint's ({', '.join(diff)}): resuming "
                                 "would not continue the same sample order; set data.allow_change=true to "
                                 "resume anyway")
            if self.rank == 0:
                print(f"warning: data config changed since the checkpoint ({', '.join(diff)}); "
                      "continuing at the same sample count (data.allow_change=true)", flush=True)
        self.state = TrainState(**client["train_state"])
        if "guard" in client:
            self.guard.load_state_dict(client["guard"])

    def _init_from_export(self, path: str) -> str:
        """Start a new run from an export's weights (step 0, fresh optimizer): continued pre-training of a
        released or imported model."""
        from glm_train.convert.export import model_config_from_dict, read_export_config
        from glm_train.convert.reshard import load_export_weights

        exported = model_config_from_dict(read_export_config(path)["model"])
        if exported != self.cfg.model:
            diff = [f.name for f in dataclasses.fields(exported)
                    if getattr(exported, f.name) != getattr(self.cfg.model, f.name)]
            raise ValueError(f"checkpoint.load={path}: the export's model config differs in {', '.join(diff)}; "
                             "use its model settings")
        load_export_weights(self.engine, path, self.cfg.model.layers, self.par.get_tensor_model_parallel_rank(),
                            self.cfg.parallel.tp)
        self.metrics.truncate_after(-1)
        if self.rank == 0:
            print(f"initialized the weights from the export {path}; optimizer and data start fresh", flush=True)
        return path

    def _load_layout_free(self, path: str) -> str:
        """Start from a resharded (layout-free) checkpoint: weights, Adam state, trainer and guard state.

        Per-rank RNG streams do not carry over to another layout: they restart from (seed, step)."""
        from glm_train.convert.reshard import load_layout_free
        from glm_train.parallel.random import TP_RANDOM

        client = load_layout_free(self.engine, path, self.cfg.model.layers,
                                  self.par.get_tensor_model_parallel_rank(), self.cfg.parallel.tp)
        self._restore_client(client)
        seed = self.cfg.train.seed + self.state.step
        seed_everything(seed)
        TP_RANDOM.seed(seed, self.par.get_pipeline_model_parallel_rank(), self.par.get_tensor_model_parallel_rank(),
                       self.par.get_tensor_model_parallel_world_size())
        self.metrics.truncate_after(self.state.step)
        if self.rank == 0:
            print(f"started from the layout-free checkpoint {path} at step {self.state.step} "
                  f"({self.state.consumed_samples} samples)", flush=True)
        return path

    def _save(self) -> None:
        self.ckpt.save(self.state.step, {"train_state": copy.deepcopy(vars(self.state)),
                                         "data_fingerprint": self.data_fingerprint,
                                         "guard": self.guard.state_dict()}, {"rng": rng_state()})

    # ------------------------------------------------------------------ one step
    def _sample(self, i: int) -> Any:
        s = self.data.sample(i)
        if self.corrupt is not None and self.corrupt[0] <= i < self.corrupt[1]:
            s = corrupt_sample(s, i, self.cfg.train.seed, self.tokenizer.sp_vocab_size)
        return s

    def _micro_batches(self, first_sample: int, global_batch: int
                       ) -> Iterator[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """This data-parallel rank's micro-batches of a global batch (contiguous sample ranges), built
        one at a time as DeepSpeed loads them: after the first, each is built while the device still
        runs the previous one's backward pass (its kernels are queued, not finished)."""
        t = self.cfg.train
        per_rank = global_batch // self.dp
        start = first_sample + self.dp_rank * per_rank
        for m in range(per_rank // t.micro_batch):
            first = start + m * t.micro_batch
            b = collate([self._sample(i) for i in range(first, first + t.micro_batch)])
            yield (b["input_ids"], b["position_ids"], b["prefix_lengths"]), (b["targets"], b["loss_mask"])

    def _set_egs(self, alpha: float) -> None:
        from glm_train.model.embedding import GLMEmbedding

        for mod in self.engine.module.modules():
            if isinstance(mod, GLMEmbedding):
                mod.egs_alpha = alpha

    def train_step(self) -> tuple[dict[str, Any], Verdict | None]:
        """One optimizer step (or a refused one); returns its metrics and the guard's verdict."""
        cfg, st = self.cfg, self.state
        step = st.step + 1
        first = next_position(st.consumed_samples, st.skipped_ranges)
        gb = global_batch_at(first, cfg.train)
        if gb != self.engine.train_batch_size():
            self.engine.set_train_batch_size(gb)
        alpha = st.egs_override if st.egs_override is not None else self.egs(st.step)
        self._set_egs(alpha)
        lr = lr_at(st.step, cfg.train, first) * st.lr_scale
        set_lr(self.engine, lr)
        if self.loss_fn is not None:
            huge = cfg.debug.huge_grad_steps
            self.loss_fn.grad_multiplier = 1e30 if huge and step in huge else 1.0
        scored_tokens: list[float] = []

        def batches() -> Iterator[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
            for batch in self._micro_batches(first, gb):
                scored_tokens.append(float(batch[1][1].sum()))  # a host tensor still: no device sync
                yield batch
        verdicts: list[Verdict] = []

        g = cfg.stability.guard
        if g.start_step is not None:
            judging = step > g.start_step
        elif uses_sample_schedule(cfg.train):
            judging = first >= (cfg.train.warmup_samples or 0)
        else:
            judging = step > cfg.train.warmup_iters

        def decide() -> bool:
            loss, norm = batch_loss_and_norm(self.engine)
            verdicts.append(self.guard.judge(step, loss, norm, judging))
            return verdicts[-1].apply

        self.gate.arm(decide)
        skipped_before = self.engine.skipped_steps
        if self.timers is not None:
            self.timers.pop()  # this step's instructions only (not an evaluation's)
        t0 = time.perf_counter()
        loading = batches()
        loss = self.engine.train_batch(loading)
        dt = time.perf_counter() - t0  # includes building the micro-batches (all but the first overlap the device)
        for _ in loading:  # pipeline stages that load no data still count the scored share
            pass
        # Scored (Part-B) share of this rank's tokens: the head runs on those only (train/flops.py).
        scored = sum(scored_tokens) / max(1, gb // self.dp * cfg.model.seq_length)
        self._step_starts[step] = first
        for old in [s for s in self._step_starts if s <= step - cfg.stability.guard.rollback_window - 1]:
            del self._step_starts[old]
        st.step = step
        st.consumed_samples = first + gb
        st.elapsed_s += dt
        verdict = verdicts[0] if verdicts else None
        if not self.gate.called and cfg.precision != Precision.fp16:
            # DeepSpeed refused the update itself (a non-finite norm under ZeRO or the bf16 optimizer):
            # the same event as the guard's own non-finite refusal.
            verdict = self.guard.judge(step, float(loss), math.inf, judging)
        if verdict is not None and not verdict.apply:
            st.guard_skips += 1
        grad_norm = self.engine.get_global_grad_norm()
        rec: dict[str, Any] = {
            "step": step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "consumed_samples": st.consumed_samples,
            "global_batch": gb,
            "tokens_per_s": gb * cfg.model.seq_length / dt,
            "step_time_s": dt,
            "elapsed_s": st.elapsed_s,
            "egs_alpha": alpha,
            "update_applied": self.gate.called and self.gate.applied,
        }
        rec["first_sample"] = first
        rec.update(self._flops(gb, dt, min(1.0, scored)))
        rec["skipped_steps"] = int(self.engine.skipped_steps)
        if self.timers is not None:
            rec.update(self.timers.pop())
        if cfg.precision == Precision.fp16:
            rec["loss_scale"] = float(self.engine.optimizer.loss_scale)
            if self.engine.skipped_steps > skipped_before:
                rec["overflow"] = True
        return rec, verdict

    def _flops(self, global_batch: int, dt: float, scored_fraction: float) -> dict[str, float]:
        """Model TFLOP/s per device and MFU (HFU too when activations are recomputed)."""
        cfg = self.cfg
        tokens = global_batch * cfg.model.seq_length
        devices = dist.get_world_size()
        model = tokens * model_flops_per_token(cfg.model, cfg.model.seq_length, scored_fraction) / dt / devices
        out = {"model_tflops": model / 1e12}
        interval, selective = cfg.parallel.activation_checkpoint_interval, cfg.parallel.selective_recompute
        hw = tokens * hardware_flops_per_token(cfg.model, cfg.model.seq_length, scored_fraction, interval,
                                               selective)
        hw = hw / dt / devices
        recompute = recomputes(interval, selective)
        if recompute:
            out["hardware_tflops"] = hw / 1e12
        peak = cfg.hardware.peak_tflops
        if peak:
            out["mfu"] = model / (peak * 1e12)
            if recompute:
                out["hfu"] = hw / (peak * 1e12)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over each validation set's scored Part-B tokens.

        Runs through the pipeline engine (any tp/pp/dp): the loss function returns each micro-batch's
        summed loss, DeepSpeed averages those over micro-batches (and identical dp replicas), and the
        token count comes from the loss masks, which every rank has.
        """
        loss_fn = getattr(self.engine.module, "loss_fn", None)
        if loss_fn is not None:
            loss_fn.sum_only = True
        self._set_egs(1.0)
        mb = self.cfg.train.micro_batch
        out = {}
        try:
            for name, vs in self.valid.items():
                batches, count = [], 0.0
                for i in range(0, len(vs), mb):
                    chunk = list(vs.samples[i:i + mb])
                    # Pipeline stages exchange fixed-shape buffers: pad the last micro-batch with
                    # copies that carry no loss.
                    while len(chunk) < mb:
                        pad = copy.copy(chunk[0])
                        pad.loss_mask = np.zeros_like(pad.loss_mask)
                        chunk.append(pad)
                    b = collate(chunk)
                    count += float(b["loss_mask"].sum())
                    batches.append(((b["input_ids"], b["position_ids"], b["prefix_lengths"]),
                                    (b["targets"], b["loss_mask"])))
                mean_of_sums = self.engine.eval_batch(iter(batches), num_micro_batches=len(batches),
                                                      reduce_output="avg", bcast_loss=True)
                out[f"val_loss_{name}"] = float(mean_of_sums) * len(batches) / max(count, 1.0)
        finally:
            if loss_fn is not None:
                loss_fn.sum_only = False
        return out

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainState:
        cfg = self.cfg
        self._prepare_run_dir()
        resumed_from = self._resume()
        self._record({"event": "resume" if resumed_from else "start", "step": self.state.step,
                      "consumed_samples": self.state.consumed_samples, "checkpoint": resumed_from})
        self._init_wandb()
        t = cfg.train
        evaluate_every = cfg.eval.every
        if self.state.step == 0 and evaluate_every > 0:
            self._log({"step": 0, **self.evaluate(), "elapsed_s": 0.0})
        bar = self._progress()
        start_elapsed = self.state.elapsed_s
        last_saved = self.state.step
        while self.state.step < t.iters:
            rec, verdict = self.train_step()
            if verdict is not None and not verdict.apply:
                self._log_guard("skip", verdict)
            elif not math.isfinite(rec["loss"]) and not rec.get("overflow"):
                raise FloatingPointError(f"non-finite loss at step {rec['step']}: {rec['loss']}")
            if self.state.step % cfg.run.log_every == 0 or self.state.step == t.iters:
                self._log(rec)
            if verdict is not None and verdict.rollback:
                self._rollback(verdict)
                last_saved = self.state.step
                continue
            # Training seconds of this process (evaluation and checkpointing excluded).
            out_of_time = t.max_seconds is not None and self.state.elapsed_s - start_elapsed >= t.max_seconds
            interrupted = out_of_time or self.state.step == t.exit_at_step
            last = self.state.step == t.iters or interrupted
            if evaluate_every > 0 and (self.state.step % evaluate_every == 0 or self.state.step == t.iters
                                       or out_of_time):
                self._log({"step": self.state.step, **self.evaluate(), "elapsed_s": self.state.elapsed_s})
            if (cfg.checkpoint.every > 0 and self.state.step % cfg.checkpoint.every == 0) or last:
                self._save()
                last_saved = self.state.step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}", refresh=False)
            if interrupted:
                if self.rank == 0:
                    why = f"train.max_seconds={t.max_seconds}" if out_of_time else f"train.exit_at_step={t.exit_at_step}"
                    print(f"\nstopping at step {self.state.step}: {why} reached", flush=True)
                break
        if bar is not None:
            bar.close()
        if self.state.step != last_saved:
            self._save()
        if self.rank == 0:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        if self._wandb is not None:
            self._wandb.finish()
        return self.state

    # ------------------------------------------------------------------ spike guard
    def _log_guard(self, event: str, verdict: Verdict | None = None, **extra: Any) -> None:
        rec: dict[str, Any] = {"step": self.state.step, "guard_event": event}
        if verdict is not None:
            rec.update(reason=verdict.reason, loss=verdict.loss, grad_norm=verdict.grad_norm,
                       loss_median=verdict.loss_median, grad_median=verdict.grad_median)
        rec.update(extra)
        self.metrics.write(rec)
        if self.rank == 0:
            detail = ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("step", "guard_event"))
            print(f"\nguard: {event} at step {self.state.step}: {detail}", flush=True)

    def _rollback(self, verdict: Verdict) -> None:
        """Return to the last checkpoint before the spike region and never read its data again."""
        g = self.cfg.stability.guard
        st = self.state
        first_spike = self.guard.region_start(st.step)
        region = [self._step_starts.get(first_spike, st.consumed_samples), st.consumed_samples]
        target = self.ckpt.latest_before(first_spike)
        if target is None:
            self._log_guard("rollback_unavailable", verdict, region=region,
                            why="no checkpoint before the spike region; skipping updates only")
            return
        if st.rollbacks >= g.max_rollbacks:
            self._log_guard("rollback_limit", verdict, region=region)
            raise RuntimeError(f"spike guard: {st.rollbacks} rollbacks already (stability.guard.max_rollbacks="
                               f"{g.max_rollbacks}); stopping instead of looping")
        keep = {"skipped_ranges": st.skipped_ranges + [region], "rollbacks": st.rollbacks + 1,
                "lr_scale": st.lr_scale * g.lr_factor, "guard_skips": st.guard_skips,
                "egs_override": g.egs_alpha if g.egs_alpha is not None else st.egs_override}
        from_step = st.step
        abandoned = self.ckpt.abandon_after(int(target.name.split("_")[1]), tag=f"rollback{keep['rollbacks']}")
        client, rank_state = self.ckpt.load(str(target))
        self.state = TrainState(**{**client["train_state"], **keep})
        self.guard.load_state_dict(client["guard"])
        set_rng_state(rank_state["rng"])
        self._step_starts.clear()
        self._log_guard("rollback", verdict, from_step=from_step, to_step=self.state.step,
                        skipped_samples=region, lr_scale=self.state.lr_scale,
                        egs_override=self.state.egs_override, abandoned=abandoned)
        self._write_skipped()
        self._record({"event": "rollback", "step": self.state.step, "from_step": from_step,
                      "skipped_samples": region, "checkpoint": str(target)})
        # The checkpoint now carries the new skipped range, so a crash from here resumes past it.
        self._save()

    def _write_skipped(self) -> None:
        if self.rank != 0:
            return
        path = self.run_dir / "skipped_samples.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"skipped_ranges": self.state.skipped_ranges,
                                   "rollbacks": self.state.rollbacks}, indent=1) + "\n")
        os.replace(tmp, path)

    def _log(self, rec: dict[str, Any]) -> None:
        self.metrics.write(rec)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def _progress(self) -> Any:
        if self.rank != 0 or not self.cfg.train.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.iters, initial=self.state.step, desc="train", unit="step",
                    mininterval=1.0, dynamic_ncols=True)

    def _init_wandb(self) -> None:
        if self.rank != 0 or not self.cfg.run.wandb:
            return
        import wandb
        from omegaconf import OmegaConf

        self._wandb = wandb.init(project=self.cfg.run.wandb_project, dir=str(self.run_dir),
                                 mode=self.cfg.run.wandb_mode,
                                 config=OmegaConf.to_container(OmegaConf.structured(self.cfg), resolve=True))


def corrupt_sample(sample: Any, index: int, seed: int, n_regular: int) -> Any:
    """Fault injection: the sample's regular tokens (inputs and targets) become random ones; special
    tokens, positions and masks stay, so only the data is bad."""
    rng = np.random.default_rng([seed, index, 0xBAD])
    out = copy.copy(sample)
    ids = np.array(sample.input_ids, copy=True)
    regular = ids < n_regular
    ids[regular] = rng.integers(0, n_regular, int(regular.sum()))
    tgt = np.array(sample.targets, copy=True)
    scored = tgt < n_regular
    tgt[scored] = rng.integers(0, n_regular, int(scored.sum()))
    out.input_ids, out.targets = ids, tgt
    return out


def shutdown() -> None:
    """Barrier then destroy the group: without it about one run in ten aborted at exit (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
