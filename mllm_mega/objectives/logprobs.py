"""Per-token and per-segment log-probs from logits (placeholder with wt-logps's signatures; TP1 only).

The logps branch replaces this file with the vocab-parallel kernel version.
"""
from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, kernels: str = "auto", tp_group=None,
                ignore_index: int = -100) -> torch.Tensor:
    """log p(labels_i) per row of logits (T, V) -> (T,) float32, 0 where labels_i == ignore_index."""
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        raise NotImplementedError("placeholder token_logps: TP1 only")
    valid = labels != ignore_index
    lp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, lp, torch.zeros_like(lp))


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(T,) long: the index of the packed segment [cu[s], cu[s+1]) holding each token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[:num_tokens]


def segment_logps(logits, labels, cu_seqlens, *, kernels: str = "auto", tp_group=None, ignore_index: int = -100):
    """Sum of log p(labels_i) over each packed segment -> (num_segments,) float32, differentiable."""
    lp = token_logps(logits, labels, kernels=kernels, tp_group=tp_group, ignore_index=ignore_index)
    seg = segment_ids(cu_seqlens.to(lp.device), lp.shape[0])
    return torch.zeros(cu_seqlens.numel() - 1, dtype=torch.float32, device=lp.device).index_add(0, seg, lp)
