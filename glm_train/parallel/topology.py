"""Process groups for tp x pp x dp from DeepSpeed's topology, and an mpu object over them.

Rank order follows ``PipeModelDataParallelTopology`` (axes pipe, data, model; model fastest), so TP
ranks are neighbours (on one node on GPU clusters) and the grid is the one DeepSpeed's pipeline
engine builds for itself.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

from glm_train.parallel.state import set_tensor_parallel_group


class ParallelState:
    """Megatron-style ``mpu``: ranks, sizes and groups of each parallel dimension.

    DeepSpeed accepts it as ``mpu`` (it has get_{model,data}_parallel_{rank,world_size,group});
    our blocks read the tensor-parallel group from :mod:`glm_train.parallel.state`.
    """

    def __init__(self, tp: int, pp: int, dp: int) -> None:
        if dist.get_world_size() != tp * pp * dp:
            raise ValueError(f"world size {dist.get_world_size()} != tp*pp*dp = {tp}*{pp}*{dp}")
        self.topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
        # Collective: every rank creates every group, in the same order.
        self.grid = PipelineParallelGrid(topology=self.topology)
        set_tensor_parallel_group(self.grid.get_slice_parallel_group() if tp > 1 else None)
        self.tp, self.pp, self.dp = tp, pp, dp

    # tensor parallel
    def get_tensor_model_parallel_rank(self) -> int:
        return self.grid.get_slice_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.grid.get_slice_parallel_group()

    # pipeline
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.grid.get_stage_id()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.grid.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.grid.get_data_parallel_group()

    # "model parallel" in DeepSpeed's sense: everything but data parallel (pipe x tensor)
    def get_model_parallel_rank(self) -> int:
        return self.grid.get_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.grid.get_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.grid.get_model_parallel_group()
