"""Triton kernels for mllm_mega, importable as ``mllm_mega.kernels``.

Each op module holds its torch reference (``*_ref``, the specification), the Triton kernels, launchers,
an autograd Function and the public function:
- ``varlen_attention``: packed attention with flash-attn's ``flash_attn_varlen_func`` call (GQA, causal);
- ``apply_rope``: RoPE / MRoPE / ViT 2-D RoPE with angles computed from position ids in the kernel;
- ``rms_norm``: RMSNorm with HF Qwen2RMSNorm numerics;
- ``loss_weights`` + ``weighted_cross_entropy``: packed, reweighted, vocab-parallel cross-entropy;
- ``cross_entropy_per_token``: the same per row, unreduced (per-token log-probs for preference objectives);
- ``launch_counts`` / ``counting_launches``: launches of each kernel, to prove which ones ran.
"""
import os as _os

import torch as _torch

# Triton decides at @triton.jit time whether a kernel is compiled or interpreted. Without CUDA a compiled
# kernel cannot run at all, so default to the interpreter (correctness-only, slow) before the kernel
# modules below are imported; an explicit TRITON_INTERPRET setting is respected.
if "TRITON_INTERPRET" not in _os.environ and not _torch.cuda.is_available():
    _os.environ["TRITON_INTERPRET"] = "1"

from ._counts import KERNEL_NAMES, counting_launches, launch_counts, reset_launch_counts
from .cross_entropy import (cross_entropy_per_token, cross_entropy_per_token_ref, loss_weights,
                            weighted_cross_entropy, weighted_cross_entropy_ref)
from .rmsnorm import rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref
from .varlen_attention import varlen_attention, varlen_attention_ref

__all__ = [
    "varlen_attention", "varlen_attention_ref",
    "apply_rope", "apply_rope_ref",
    "rms_norm", "rms_norm_ref",
    "loss_weights", "weighted_cross_entropy", "weighted_cross_entropy_ref",
    "cross_entropy_per_token", "cross_entropy_per_token_ref",
    "KERNEL_NAMES", "launch_counts", "reset_launch_counts", "counting_launches",
]
