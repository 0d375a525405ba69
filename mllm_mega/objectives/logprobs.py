"""Per-token and per-segment log-probabilities from vocab-parallel logits, for preference objectives.

DPO (Rafailov et al., arXiv:2305.18290) and MPO (InternVL2.5-MPO, arXiv:2411.10442) compare
log pi(y | x) = sum over the completion's tokens of log p(token) between the policy and a reference model.
Here those sums come from the same cross-entropy kernel as the next-token loss: per row it forms the
log-sum-exp and the target logit, under tensor parallelism from each rank's vocab slice combined by one MAX
and one SUM all-reduce of per-row statistics, so the (T, V) vocabulary is never gathered.
log p(label_i) = -ce_i. Labels are already shifted (label i is the target of position i), -100 outside
completions; a packed sequence's segments are delimited by ``cu_seqlens`` as for attention.
"""
from __future__ import annotations

import torch

from mllm_mega.models.common.kernel_choice import resolve_kernels


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, kernels: str = "auto", tp_group=None,
                ignore_index: int = -100) -> torch.Tensor:
    """log p(labels_i) per row of logits (T, V/TP) -> (T,) float32, 0 where labels_i == ignore_index.

    ``kernels``: torch | triton | auto (Triton on CUDA). Under TP, pass the tensor-parallel group; the
    result is replicated over it. Differentiable in logits.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"token_logps: expected logits (T, V) and labels (T,); got logits "
                         f"{tuple(logits.shape)}, labels {tuple(labels.shape)}")
    from mllm_mega.kernels import cross_entropy_per_token, cross_entropy_per_token_ref

    fn = cross_entropy_per_token if resolve_kernels(kernels) == "triton" else cross_entropy_per_token_ref
    return -fn(logits, labels, ignore_index=ignore_index, tp_group=tp_group)


def segment_ids(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(T,) long: the index of the packed segment [cu[s], cu[s+1]) holding each token."""
    cu = cu_seqlens.to(dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 1 or int(cu[0]) != 0 or int(cu[-1]) != num_tokens:
        raise ValueError(f"segment_logps: cu_seqlens must be (S + 1,) from 0 to the {num_tokens} tokens, got "
                         f"{cu.tolist() if cu.numel() <= 16 else tuple(cu.shape)}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"segment_logps: cu_seqlens must be non-decreasing, got {cu.tolist()}")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, *, kernels: str = "auto",
                  tp_group=None, ignore_index: int = -100) -> torch.Tensor:
    """Sum of log p(labels_i) over each packed segment -> (num_segments,) float32, differentiable.

    logits (T, V/TP), labels (T,), cu_seqlens (S + 1,) with cu_seqlens[-1] == T; segments with no
    supervised label (padding, empty segments) sum to 0.
    """
    lp = token_logps(logits, labels, kernels=kernels, tp_group=tp_group, ignore_index=ignore_index)  # (T,)
    seg = segment_ids(cu_seqlens.to(lp.device), lp.shape[0])
    out = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.float32, device=lp.device)
    return out.index_add(0, seg, lp)
