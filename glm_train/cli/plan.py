"""glm-plan: per-GPU memory, pipeline bubble and step time of a model and layout, before renting GPUs.

    glm-plan --config-name=glm-130b-3d --world-size 768 --gpu-mem 40 --peak-tflops 312 --mfu 0.325
    glm-plan model=glm-1b train.micro_batch=8 train.global_batch=8 precision=bf16 --gpu-mem 80
    glm-plan model=glm-1b train.micro_batch=1 train.global_batch=4 precision=bf16 --gpu-mem 79 --max-micro-batch

Overrides are the training config's KEY=VALUE pairs (data paths are not checked), e.g.
parallel.selective_recompute=[attention,geglu]. The formulas are in glm_train/train/plan.py;
docs/performance.md compares them with measured peaks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: prints the plan; exit 0 if it fits, 3 if not, 2 on a bad config."""
    p = argparse.ArgumentParser(prog="glm-plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    p.add_argument("--config-name", default="config")
    p.add_argument("--world-size", type=int, default=None, help="GPUs (default tp*pp)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="per GPU (default hardware.peak_tflops or 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization for the step time")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="cpu: dropout keeps its noise, SDPA with attention dropout runs its math path")
    p.add_argument("--max-micro-batch", action="store_true",
                   help="plan the largest micro-batch that fits --gpu-mem instead of train.micro_batch (the "
                        "micro-batches per pipeline kept: the global batch scales with it); its last line "
                        "names it")
    args = p.parse_intermixed_args(argv)  # overrides may follow options
    from glm_train.config import AttentionImpl, ConfigError, load_config

    world = args.world_size
    try:
        if world is not None:
            os.environ["WORLD_SIZE"] = str(world)
        cfg = load_config(list(args.overrides), config_name=args.config_name, check_paths=False)
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size: set it (the planner has no tokenizer to read it from)")
        m = cfg.model
        if m.vocab_size % m.pad_vocab_multiple:
            m.vocab_size += m.pad_vocab_multiple - m.vocab_size % m.pad_vocab_multiple
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from glm_train.train.plan import GIB, OVERHEAD, largest_micro_batch, plan, step_time, with_micro_batch

    world = world or cfg.parallel.tp * cfg.parallel.pp
    if args.max_micro_batch:
        found = largest_micro_batch(cfg, world, args.gpu_mem * GIB, args.device)
        if found is None:
            print(f"not even micro-batch 1 fits {args.gpu_mem:g} GiB; its plan:")
        cfg = with_micro_batch(cfg, found or 1, world)
    r = plan(cfg, world, args.device)
    peak = args.peak_tflops or cfg.hardware.peak_tflops or 989.0
    par = cfg.parallel
    selective = ", ".join(par.selective_recompute) or "none"
    if cfg.train.compile:
        selective += " (train.compile: Inductor recomputes gelu(gate) itself)"
    print(f"{m.name}: L={m.layers} h={m.hidden} heads={m.heads} ffn={m.ffn_size()} V={m.vocab_size} "
          f"s={m.seq_length}; tp={par.tp} pp={par.pp} dp={r['dp']} ZeRO-{par.zero_stage} {cfg.precision.value}, "
          f"micro-batch {cfg.train.micro_batch}, global {cfg.train.global_batch} "
          f"({r['micro_batches_per_pipeline']} micro-batches per pipeline), "
          f"recompute interval {par.activation_checkpoint_interval}, selective recompute: {selective}")
    full, kept = r["activations_per_layer_full"], r["activations_per_layer"]
    impl = AttentionImpl(m.attention_impl)
    kernel = impl.resolve(args.device).value + (" via auto" if impl == AttentionImpl.auto else "")
    print(f"activations per block and micro-batch: {kept / 2**20:,.1f} MiB ({kernel} attention"
          + (f"; {full / 2**20:,.1f} MiB without selective recompute)" if kept != full else ")"))
    # step: buffers of the optimizer step (FP32 gradient partition, or ZeRO's two reduction buckets,
    # one of which already exists during the backward pass); bwd: one block's backward pass beyond the
    # stored activations, incl. a recomputed chunk; head: the loss's logits and hidden states.
    print(f"{'stage':>5}{'params':>10}{'weights':>10}{'grads':>9}{'optim':>9}{'step':>8}{'activ':>9}{'head':>8}"
          f"{'bwd':>8}{'total GiB':>11}")
    for st in r["stages"]:
        grads = f"{st.gradients / GIB:>8.2f}" + (" " if st.grads_at_peak else "*")
        print(f"{st.stage:>5}{st.params / 1e9:>9.2f}B{st.weights / GIB:>10.2f}{grads}{st.optimizer / GIB:>9.2f}"
              f"{max(st.step, 2 * st.bucket) / GIB:>8.2f}{st.activations / GIB:>9.2f}{st.logits / GIB:>8.2f}"
              f"{st.backward / GIB:>8.2f}{st.total / GIB:>11.2f}")
    if not all(st.grads_at_peak for st in r["stages"]):
        print("* gradients made during the backward pass, not yet there when the activations peak")
    worst = r["worst"]
    fits = worst.total <= args.gpu_mem * GIB
    print(f"largest stage {worst.stage}: {worst.total / GIB:.1f} GiB incl. {100 * (OVERHEAD - 1):.0f}% overhead, "
          f"at the {'optimizer step' if worst.peak_phase == 'step' else 'backward pass'}, "
          f"GPU {args.gpu_mem:.0f} GiB: {'fits' if fits else 'DOES NOT FIT'}")
    print(f"pipeline bubble {r['bubble']:.1%}; {r['tokens_per_step']:,} tokens/step; step time at MFU "
          f"{args.mfu:.1%} of {peak:g} TFLOP/s: {step_time(r, world, peak, args.mfu):.2f} s")
    if args.max_micro_batch and fits:
        print(f"largest micro-batch that fits {args.gpu_mem:g} GiB: {cfg.train.micro_batch} "
              f"(global batch {cfg.train.global_batch})")
    return 0 if fits else 3


if __name__ == "__main__":
    sys.exit(main())
