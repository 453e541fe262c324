"""glm-generate: load a checkpoint and continue a prompt, or fill the [MASK]s written in it."""

from __future__ import annotations

import enum
import os
import sys
from dataclasses import dataclass, field

from glm_train.infer.generate import Mode, SamplingConfig


class Quant(str, enum.Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"


@dataclass
class GenerateConfig:
    """Arguments of glm-generate (KEY=VALUE)."""

    checkpoint: str = "runs/demo"
    """An export, a run dir (its latest checkpoint) or a checkpoint folder."""
    prompt: str = "In the beginning"
    """Text to continue (English or Chinese); with mode=mask, a text with [MASK]s to fill."""
    mode: Mode = Mode.gmask
    """gmask: continue the prompt (Part A = prompt + [gMASK]); mask: fill every [MASK] in the prompt."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling settings, e.g. sampling.temperature=0.7 sampling.max_new_tokens=100 sampling.num_beams=4."""
    use_cache: bool = True
    """KV-cache decoding (false: recompute the whole sequence at every step, the reference)."""
    quant: Quant = Quant.none
    """Weight-only quantization of the four linear layers of every block: none, int8 or int4."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""


def _init_tp() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1) all processes form one tensor-parallel group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    from glm_train.parallel.state import set_tensor_parallel_group

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    set_tensor_parallel_group(dist.group.WORLD)
    return dist.get_rank(), world


def generate_cli(overrides: list[str]) -> int:
    """Usage: glm-generate checkpoint=RUN_DIR prompt="..." [mode=gmask|mask use_cache=true quant=none|int8|int4
    sampling.temperature=0.8 sampling.top_k=40 sampling.top_p=0.95 sampling.repetition_penalty=1.3
    sampling.max_new_tokens=64 sampling.min_new_tokens=0 sampling.num_beams=1 sampling.length_penalty=1.0
    sampling.seed=0 device=auto]

    Tensor-parallel: torchrun --nproc_per_node N -m glm_train.cli.generate KEY=VALUE ... (each rank loads
    its shard of any checkpoint layout; rank 0 prints).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from glm_train.config import ConfigError

    try:
        merged = OmegaConf.merge(OmegaConf.structured(GenerateConfig), OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + f" (key: {getattr(e, 'full_key', '?')})") from None
    assert isinstance(cfg, GenerateConfig)
    if cfg.sampling.num_beams < 1:
        raise ConfigError(f"sampling.num_beams must be >= 1, not {cfg.sampling.num_beams}")
    import torch

    from glm_train.infer.generate import generate
    from glm_train.infer.loading import load_trained

    rank, _ = _init_tp()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tok, _ = load_trained(cfg.checkpoint, device)
    if cfg.quant != Quant.none:
        from glm_train.infer.quant import quantize_model  # written alongside; imported only when asked for

        model = quantize_model(model, 8 if cfg.quant == Quant.int8 else 4)
    text = generate(model, tok, cfg.prompt, cfg.sampling, mode=cfg.mode, use_cache=cfg.use_cache)
    if rank == 0:
        print(cfg.prompt + text if cfg.mode == Mode.gmask else text)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def main() -> None:
    from glm_train.cli.common import run_cli

    sys.exit(run_cli(generate_cli))


if __name__ == "__main__":
    main()
