"""Norm modules for the ``input_layernorm`` / ``pre_mlp_layernorm`` slots (megatron's norm call signature).

RMSNorm follows Qwen2's definition (fp32 statistics, weight applied after casting back); the Triton variant
uses ``mllm_mega.kernels.rms_norm``. LayerNorm (Qwen2-VL's ViT) is torch's.
"""
from __future__ import annotations

import torch
from torch import nn


class TorchRMSNorm(nn.Module):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        if config is not None and getattr(config, "sequence_parallel", False):
            self.weight.sequence_parallel = True  # its grad is all-reduced over the TP group

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class TritonRMSNorm(TorchRMSNorm):
    def forward(self, x):
        from mllm_mega.kernels import rms_norm

        return rms_norm(x, self.weight, self.eps)


class TorchLayerNorm(nn.LayerNorm):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **kwargs):
        super().__init__(hidden_size, eps=eps)
        if config is not None and getattr(config, "sequence_parallel", False):
            self.weight.sequence_parallel = True
            self.bias.sequence_parallel = True
