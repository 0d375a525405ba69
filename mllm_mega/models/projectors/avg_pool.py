"""The average-pooling projector of Open-Qwen2VL (``prismatic-vlms``): ``AdaptiveAvgPool2d`` over each image's
patch grid to k x k (12 x 12 = 144 tokens in pretraining, 27 x 27 = 729 in SFT: the same weights), then
Linear(vision width -> LLM width), GELU, Linear(LLM width -> LLM width). With k equal to the patch grid the pool
is the identity (a mean of one value) and the projector is LLaVA's ``multi_modal_projector`` exactly.

Tensor parallelism: ``linear_1`` is column-parallel, ``linear_2`` row-parallel; the pool has no weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule


def pool_patch_grid(x: torch.Tensor, num_images: int, grid: int, k: int) -> torch.Tensor:
    """(num_images * grid*grid, C) features in row-major patch order -> (num_images * k*k, C), each output the
    mean over torch ``AdaptiveAvgPool2d``'s bin (rows floor(i*g/k) .. ceil((i+1)*g/k), the same for columns)."""
    c = x.shape[-1]
    x = x.view(num_images, grid, grid, c).permute(0, 3, 1, 2)  # (N, C, g, g)
    x = F.adaptive_avg_pool2d(x, k)
    return x.permute(0, 2, 3, 1).reshape(num_images * k * k, c)


class AvgPoolProjector(MegatronModule):
    """adaptive average pool (k x k) -> Linear -> GELU -> Linear (column/row parallel)."""

    def __init__(self, config, arch, kernels: str = "torch"):
        """``arch``: the vision arch (``hidden_size``, ``grid``, ``pool_grid``, ``out_hidden_size``,
        ``projector_bias``)."""
        super().__init__(config=config)
        self.grid, self.pool_grid = arch.grid, arch.pool_grid
        self.linear_1 = ColumnParallelLinear(arch.hidden_size, arch.out_hidden_size, config=config,
                                             init_method=config.init_method, bias=arch.projector_bias,
                                             gather_output=False)
        self.linear_2 = RowParallelLinear(arch.out_hidden_size, arch.out_hidden_size, config=config,
                                          init_method=config.output_layer_init_method, bias=arch.projector_bias,
                                          input_is_parallel=True, skip_bias_add=False)

    def forward(self, x, grid_thw):  # x (num_images * g*g, hidden) -> (num_images * k*k, out_hidden)
        num_images = int(grid_thw.shape[0])
        if self.pool_grid != self.grid:
            x = pool_patch_grid(x, num_images, self.grid, self.pool_grid)
        x, _ = self.linear_1(x)
        x, _ = self.linear_2(F.gelu(x))
        return x


def build_projector(arch, vision_config, *, kernels: str = "torch") -> AvgPoolProjector:
    """The projector part of :mod:`mllm_mega.models.vlm` (``arch``: the whole model arch)."""
    return AvgPoolProjector(vision_config, arch.vision, kernels=kernels)
