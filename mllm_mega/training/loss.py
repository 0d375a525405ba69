"""The loss slot: packed, reweighted cross-entropy over vocab-parallel logits.

``kernels`` is the same switch as the layer specs (torch | triton | auto): Triton's chunked kernel on CUDA,
the torch specification on CPU. Both return the unnormalised ``sum_i w_i * ce_i``; the trainer divides by the
global sum of weights (across micro-batches and data-parallel ranks), so token / sample / square averaging
does not depend on how a global batch is split.
"""
from __future__ import annotations

import torch

from mllm_mega.models.common.kernel_choice import resolve_kernels


def weighted_loss_sum(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, kernels: str = "auto",
                      tp_group=None, ignore_index: int = -100) -> torch.Tensor:
    """logits (T, V/TP) of one packed sequence, labels (T,), weights (T,) -> 0-dim fp32 sum of w * ce."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or weights.shape != labels.shape:
        raise ValueError(
            f"weighted_loss_sum: expected logits (T, V), labels (T,), weights (T,); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    from mllm_mega.kernels import weighted_cross_entropy, weighted_cross_entropy_ref

    fn = weighted_cross_entropy if resolve_kernels(kernels) == "triton" else weighted_cross_entropy_ref
    return fn(logits, labels, weights, ignore_index=ignore_index, tp_group=tp_group)
