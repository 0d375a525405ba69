"""The 2x2 patch merger of Qwen2-VL / Qwen2.5-VL (the model cards' "MLP-based vision-language merger"):
norm, then each spatial_merge_size x spatial_merge_size group of neighbouring patches (contiguous in the
processor's block-major order) concatenated and mapped by a 2-layer GELU MLP to the LLM width.

Tensor parallelism: fc1 is column-parallel, fc2 row-parallel; the norm is replicated.
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from mllm_mega.models.common.norm import TorchLayerNorm, TorchRMSNorm, TritonRMSNorm


class PatchMerger(MegatronModule):
    """norm -> group 2x2 patches -> Linear -> GELU -> Linear (column/row parallel)."""

    def __init__(self, config, arch, kernels: str = "torch"):
        """``arch``: the vision arch (hidden_size, spatial_merge_size, out_hidden_size, norm)."""
        super().__init__(config=config)
        unit = arch.spatial_merge_size ** 2
        self.merged_size = arch.hidden_size * unit
        # the same kernel switch as the layer specs (LayerNorm has no Triton kernel: torch's either way)
        rms_cls = TritonRMSNorm if kernels == "triton" else TorchRMSNorm
        norm_cls = rms_cls if arch.norm == "rmsnorm" else TorchLayerNorm
        self.ln_q = norm_cls(config, hidden_size=arch.hidden_size, eps=1e-6)
        self.fc1 = ColumnParallelLinear(self.merged_size, self.merged_size, config=config,
                                        init_method=config.init_method, bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(self.merged_size, arch.out_hidden_size, config=config,
                                     init_method=config.output_layer_init_method, bias=True,
                                     input_is_parallel=True, skip_bias_add=False)

    def forward(self, x):  # x (num_patches, hidden) -> (num_patches / unit, out_hidden)
        x = self.ln_q(x).view(-1, self.merged_size)
        x, _ = self.fc1(x)
        x, _ = self.fc2(F.gelu(x))
        return x


def build_projector(arch, vision_config, *, kernels: str = "torch") -> PatchMerger:
    """The projector part of :mod:`mllm_mega.models.vlm` (``arch``: the whole ModelArch)."""
    return PatchMerger(vision_config, arch.vision, kernels=kernels)
