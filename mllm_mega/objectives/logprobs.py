"""Per-segment completion log-probs from vocab-parallel logits (placeholder until wt-logps's kernel lands).

``segment_logps`` is the interface the preference objective calls: the sum of log p(label) over the
label != -100 tokens of each cu_seqlens segment, differentiable in the logits. This version is plain torch
(the weighted cross-entropy reference per segment at TP > 1); the logps branch replaces this file.
"""
from __future__ import annotations

import torch


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, *, kernels: str = "auto",
                  tp_group=None, ignore_index: int = -100) -> torch.Tensor:
    """logits (T, V/TP), labels (T,), cu_seqlens (S+1,) -> (S,) float32 sums of log p(label) per segment."""
    num_segments = int(cu_seqlens.numel()) - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg_of = torch.repeat_interleave(torch.arange(num_segments, device=logits.device), lengths)
    total = int(cu_seqlens[-1])
    valid = labels[:total] != ignore_index
    if tp_group is None or torch.distributed.get_world_size(tp_group) == 1:
        logp = torch.log_softmax(logits[:total].float(), dim=-1)
        tok = logp.gather(1, labels[:total].clamp(min=0)[:, None]).squeeze(1)
        tok = torch.where(valid, tok, torch.zeros_like(tok))
        return torch.zeros(num_segments, dtype=torch.float32, device=logits.device).index_add(0, seg_of, tok)
    from mllm_mega.kernels import weighted_cross_entropy_ref

    out = []
    for s in range(num_segments):
        w = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
        w[:total] = (seg_of == s).float()
        out.append(-weighted_cross_entropy_ref(logits, labels, w, ignore_index=ignore_index, tp_group=tp_group))
    return torch.stack(out)
