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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from glm_train.config import GLMConfig, PositionEncoding, SourceKind, from_yaml, to_yaml
from glm_train.data.blank_infilling import SpecialIds
from glm_train.data.dataset import GLMTrainData, ValidationSet, collate
from glm_train.data.indexed import IndexedDataset, check_fingerprint
from glm_train.data.tokenizer import GLMTokenizer
from glm_train.train.checkpoint import CheckpointManager
from glm_train.train.engine import build_engine, data_parallel_size
from glm_train.train.metrics import MetricsWriter, plot_losses
from glm_train.train.schedules import EGSSchedule


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    elapsed_s: float = 0.0


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
    """This rank's random state: python, numpy, torch CPU and CUDA (TP-sharded dropout derives from it)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.engine, cfg.checkpoint.keep_last)
        self.state = TrainState()
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

    def _resume(self) -> None:
        loaded = self.ckpt.load(self.cfg.checkpoint.load)
        if loaded is None:
            self.metrics.truncate_after(-1)
            return
        client, rank_state = loaded
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
        set_rng_state(rank_state["rng"])
        self.metrics.truncate_after(self.state.step)
        if self.rank == 0:
            print(f"resumed from step {self.state.step} ({self.state.consumed_samples} samples)", flush=True)

    def _save(self) -> None:
        self.ckpt.save(self.state.step, {"train_state": vars(self.state).copy(),
                                         "data_fingerprint": self.data_fingerprint}, {"rng": rng_state()})

    # ------------------------------------------------------------------ one step
    def _micro_batches(self) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """This data-parallel rank's micro-batches of the next global batch (contiguous sample ranges)."""
        t = self.cfg.train
        per_rank = t.global_batch // self.dp
        start = self.state.consumed_samples + self.dp_rank * per_rank
        out = []
        for m in range(per_rank // t.micro_batch):
            first = start + m * t.micro_batch
            b = collate([self.data.sample(i) for i in range(first, first + t.micro_batch)])
            out.append(((b["input_ids"], b["position_ids"], b["prefix_lengths"]), (b["targets"], b["loss_mask"])))
        return out

    def _set_egs(self, alpha: float) -> None:
        from glm_train.model.embedding import GLMEmbedding

        for mod in self.engine.module.modules():
            if isinstance(mod, GLMEmbedding):
                mod.egs_alpha = alpha

    def train_step(self) -> dict[str, Any]:
        cfg = self.cfg
        alpha = self.egs(self.state.step)
        self._set_egs(alpha)
        lr = float(self.engine.get_lr()[0])
        batches = self._micro_batches()
        t0 = time.perf_counter()
        loss = self.engine.train_batch(iter(batches))
        dt = time.perf_counter() - t0
        self.state.step += 1
        self.state.consumed_samples += cfg.train.global_batch
        self.state.elapsed_s += dt
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "step": self.state.step,
            "loss": float(loss),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "consumed_samples": self.state.consumed_samples,
            "tokens_per_s": cfg.train.global_batch * cfg.model.seq_length / dt,
            "step_time_s": dt,
            "elapsed_s": self.state.elapsed_s,
            "egs_alpha": alpha,
        }

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
        self._resume()
        self._init_wandb()
        t = cfg.train
        evaluate_every = cfg.eval.every
        if self.state.step == 0 and evaluate_every > 0:
            self._log({"step": 0, **self.evaluate(), "elapsed_s": 0.0})
        bar = self._progress()
        start_elapsed = self.state.elapsed_s
        last_saved = self.state.step
        while self.state.step < t.iters:
            rec = self.train_step()
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"non-finite loss at step {rec['step']}: {rec['loss']}")
            if self.state.step % cfg.run.log_every == 0 or self.state.step == t.iters:
                self._log(rec)
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


def shutdown() -> None:
    """Barrier then destroy the group: without it about one run in ten aborted at exit (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
