"""Process groups: torch.distributed + megatron-core's parallel_state, on NCCL (GPU) or gloo (CPU)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from mllm_mega.parallel import cpu_compat


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_distributed(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                           seed: int = 1234, num_llm_layers_in_first_stage: int | None = None,
                           context_parallel_size: int = 1) -> None:
    """Initialise torch.distributed (from torchrun's env, or as a single process) and megatron's groups.

    Re-initialises megatron's groups if called again with another layout in the same process.
    """
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    cpu_compat.apply()
    if not dist.is_initialized():
        # the trainer all-reduces small CPU tensors (loss-weight sums, stop flags, counters): NCCL takes
        # CUDA tensors only, so CPU tensors go over gloo in the same groups
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / SLURM-launched
            dist.init_process_group(backend=backend)
        else:  # plain `python ...`: a world of one (the environment is left untouched for child processes)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
    world = dist.get_world_size()
    cp = context_parallel_size  # context parallel: world = DP x CP x TP x PP
    if cp < 1 or world % (tensor_model_parallel_size * pipeline_model_parallel_size * cp):
        raise ValueError(
            f"world size {world} is not divisible by TP={tensor_model_parallel_size} x "
            f"PP={pipeline_model_parallel_size}" + (f" x CP={cp}" if cp != 1 else "")
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=cp,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
