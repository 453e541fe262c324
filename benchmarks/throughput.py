"""Training throughput of glm_train's engine against a plain PyTorch loop, side by side, and MFU.

    python benchmarks/throughput.py [--json FILE] [--steps 6] [--rounds 2] [--precisions bf16,fp32]

Fixed GLM config (issue 8): 8 layers, d=512, 8 heads, sequence 512, micro-batch 8, vocabulary 8192,
synthetic tokens. "ours" is a training step through glm_train's DeepSpeed pipeline engine (tp=pp=dp=1,
ZeRO-1, the real GLMPipelineModule and loss, bf16 = DeepSpeed's bf16 mode with FP32 master weights).
"reference" is what a careful user would write by hand and shares no code with ours: the same
architecture as an nn.Module defined below (DeepNorm, RoPE, GeGLU, prefix-LM mask through SDPA), torch
AdamW (foreach), full logits and a masked cross-entropy, bf16 through autocast as in nanoGPT. Both see
the same batches; their steps alternate in rounds so that machine noise hits both alike.

MFU = model FLOP/s (glm_train/train/flops.py; the head counted on the positions each implementation
actually scores) / the peak of a large matmul in the same precision, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS, HIDDEN, HEADS, SEQ, MICRO, VOCAB = 8, 512, 8, 512, 8, 8192


# ----------------------------------------------------------------------------- the plain reference


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos.float()[:, None, :, None] * inv  # [B,1,S,D/2]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, alpha: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc_in, self.fc_out = nn.Linear(d, 2 * ffn), nn.Linear(ffn, d)
        self.heads, self.alpha = heads, alpha

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(_rope(q, pos), _rope(k, pos), v, attn_mask=mask)
        x = h * self.alpha + self.proj(a.transpose(1, 2).reshape(b, s, d))
        h = self.ln2(x)
        gate, up = self.fc_in(h).chunk(2, -1)
        return h * self.alpha + self.fc_out(F.gelu(gate) * up)


class RefGLM(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, ffn: int, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads, ffn, (2 * layers) ** 0.5) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, ids, pos, prefix, targets, loss_mask):  # noqa: ANN001, ANN201
        s = ids.shape[1]
        i = torch.arange(s)
        # Prefix-LM: bidirectional inside Part A, causal after it.
        mask = (i[None, :] <= i[:, None])[None] | (i[None, None, :] < prefix[:, None, None])
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, pos, mask[:, None])
        logits = self.ln(x) @ self.emb.weight.t()
        tgt = targets.masked_fill(loss_mask == 0, -100)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt.view(-1), ignore_index=-100)


# ----------------------------------------------------------------------------- shared pieces


def synthetic_batch(seed: int, micro: int = MICRO, seq: int = SEQ, vocab: int = VOCAB) -> tuple[torch.Tensor, ...]:
    """GLM-shaped batch: Part A of random length, Part B scored (about half the positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 8, (micro, seq), generator=g)
    targets = torch.randint(0, vocab - 8, (micro, seq), generator=g)
    prefix = torch.randint(seq // 4, 3 * seq // 4, (micro,), generator=g)
    pos = torch.arange(seq).expand(micro, seq).contiguous()
    loss_mask = (torch.arange(seq)[None, :] >= prefix[:, None]).float()
    return ids, pos, prefix, targets, loss_mask


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul in ``dtype`` (best of ``reps`` after warm-ups): glm-bench peak."""
    from glm_train.cli.bench import matmul_tflops

    return matmul_tflops("bf16" if dtype == torch.bfloat16 else "fp32", n, "cpu", reps)


def build_ours(precision: str, layers: int = LAYERS, hidden: int = HIDDEN, heads: int = HEADS, seq: int = SEQ,
               vocab: int = VOCAB, micro: int = MICRO, zero_stage: int = 1):  # noqa: ANN201
    """glm_train's DeepSpeed engine for a GLM of this shape (tp=pp=dp=1, ZeRO-1, no dropout)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from glm_train.config import GLMConfig, Precision, validate
    from glm_train.env import setup_environment
    from glm_train.train.engine import build_engine

    setup_environment()
    cfg = GLMConfig()
    m = cfg.model
    m.layers, m.hidden, m.heads, m.seq_length, m.vocab_size, m.dropout, m.attention_dropout = (
        layers, hidden, heads, seq, vocab, 0.0, 0.0)
    cfg.train.micro_batch = cfg.train.global_batch = micro
    cfg.precision = Precision(precision)
    cfg.parallel.zero_stage = zero_stage
    validate(cfg, check_paths=False)
    engine, _ = build_engine(cfg, "gloo")
    return cfg, engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--steps", type=int, default=4, help="timed steps per implementation per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precisions", default="bf16,fp32")
    p.add_argument("--zero-stage", type=int, default=1, help="ours: 1 (default config) or 0 (fp32 only)")
    args = p.parse_args(argv)
    from glm_train.config import ModelConfig
    from glm_train.train.flops import model_flops_per_token

    torch.manual_seed(0)
    batches = [synthetic_batch(i) for i in range(args.steps)]
    scored = float(sum(b[4].sum() for b in batches)) / (len(batches) * MICRO * SEQ)
    mcfg = ModelConfig(layers=LAYERS, hidden=HIDDEN, heads=HEADS, seq_length=SEQ, vocab_size=VOCAB)
    flops_ours = model_flops_per_token(mcfg, SEQ, scored)
    flops_ref = model_flops_per_token(mcfg, SEQ, 1.0)  # the plain loop computes every position's logits
    out: dict[str, float | str | dict] = {"config": f"L{LAYERS} d{HIDDEN} h{HEADS} s{SEQ} b{MICRO} V{VOCAB}",
                                          "zero_stage": args.zero_stage,
                                          "threads": torch.get_num_threads(), "scored_fraction": scored}
    rows = []
    for prec in args.precisions.split(","):
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        peak = matmul_peak(dtype)
        _, engine = build_ours(prec, zero_stage=args.zero_stage)
        ref = RefGLM(LAYERS, HIDDEN, HEADS, mcfg.ffn_size(), VOCAB)
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, foreach=True)

        def step_ours(b: tuple[torch.Tensor, ...], engine=engine) -> None:
            ids, pos, prefix, targets, mask = b
            engine.train_batch(iter([((ids, pos, prefix), (targets, mask))]))

        def step_ref(b: tuple[torch.Tensor, ...], ref=ref, opt=opt, dtype=dtype) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = ref(*b)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_ours(batches[0])  # warm-up (first-step allocations, lazy optimizer state)
        step_ref(batches[0])
        times: dict[str, list[float]] = {"ours": [], "reference": []}
        for _ in range(args.rounds):
            for name, fn in (("ours", step_ours), ("reference", step_ref)):
                for b in batches:
                    t = time.perf_counter()
                    fn(b)
                    times[name].append(time.perf_counter() - t)
        tok = MICRO * SEQ
        med = {k: statistics.median(v) for k, v in times.items()}
        res = {
            "tokens_per_s_ours": tok / med["ours"],
            "tokens_per_s_reference": tok / med["reference"],
            "ratio_vs_reference": med["reference"] / med["ours"],
            "peak_tflops": peak,
            "mfu": tok * flops_ours / med["ours"] / (peak * 1e12),
            "mfu_reference": tok * flops_ref / med["reference"] / (peak * 1e12),
        }
        out[prec] = res
        rows.append((prec, res))
        del engine
    # Top-level keys of the issue: the bf16 ratio and MFU, and the fp32 MFU.
    if "bf16" in out:
        out["ratio_vs_reference"] = out["bf16"]["ratio_vs_reference"]  # type: ignore[index]
        out["mfu"] = out["bf16"]["mfu"]  # type: ignore[index]
    if "fp32" in out:
        out["mfu_fp32"] = out["fp32"]["mfu"]  # type: ignore[index]
        out["ratio_vs_reference_fp32"] = out["fp32"]["ratio_vs_reference"]  # type: ignore[index]
    print(f"\n{out['config']}, {out['threads']} threads, scored fraction {scored:.3f}")
    print(f"{'precision':<10}{'ours tok/s':>12}{'ref tok/s':>12}{'ratio':>8}{'peak TF/s':>11}{'MFU ours':>10}"
          f"{'MFU ref':>9}")
    for prec, r in rows:
        print(f"{prec:<10}{r['tokens_per_s_ours']:>12.0f}{r['tokens_per_s_reference']:>12.0f}"
              f"{r['ratio_vs_reference']:>8.2f}{r['peak_tflops']:>11.3f}{r['mfu']:>10.1%}{r['mfu_reference']:>9.1%}")
    finish(out, args.json)
    return 0


def finish(out: dict, json_path: str | None) -> None:
    """Write the figures (if asked) and close the process group the engine opened."""
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
