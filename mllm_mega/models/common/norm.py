"""Norm modules for the ``input_layernorm`` / ``pre_mlp_layernorm`` slots (megatron's norm call signature).

RMSNorm follows Qwen2's definition (transformers' ``Qwen2RMSNorm``: statistics in fp32, the normalised
activations cast back to the input dtype, then multiplied by the weight); the Triton variant uses
``mllm_mega.kernels.rms_norm`` with the same numerics. LayerNorm (Qwen2-VL's ViT) is torch's, whose kernels
accumulate mean and variance in fp32 for bf16/fp16 inputs. Weights are created in the model's
``config.params_dtype`` (bf16 in a bf16 run; megatron's optimizer keeps their fp32 master copies) and every
norm returns its input's dtype, as HF's does when weight and input share a dtype.
"""
from __future__ import annotations

import torch
from torch import nn


def _params_dtype(config) -> torch.dtype:
    return getattr(config, "params_dtype", None) or torch.float32


class TorchRMSNorm(nn.Module):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, sequence_parallel_grad: bool = True,
                 **kwargs):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=_params_dtype(config)))
        self.eps = eps
        if sequence_parallel_grad and config is not None and getattr(config, "sequence_parallel", False):
            self.weight.sequence_parallel = True  # its grad is all-reduced over the TP group

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf.to(x.dtype)).to(x.dtype)


class TritonRMSNorm(TorchRMSNorm):
    def forward(self, x):
        from mllm_mega.kernels import rms_norm

        # the kernel returns promote(x, weight) like HF: the same as x's dtype when the weight matches it
        return rms_norm(x, self.weight, self.eps).to(x.dtype)


class TorchLayerNorm(nn.LayerNorm):
    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=_params_dtype(config))
        if config is not None and getattr(config, "sequence_parallel", False):
            self.weight.sequence_parallel = True
            self.bias.sequence_parallel = True
