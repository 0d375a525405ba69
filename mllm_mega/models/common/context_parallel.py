"""The model side of context parallelism: the attention slot's CP path and the CP embedding scatter.

Attention: q/k are rotated locally (their position ids were sliced with the tokens, so RoPE/MRoPE stays
exact), K and V are all-gathered over the CP group in one collective, and each local chunk attends to the
key prefix of its own sample (``CPShard.kv_index``) with a bottom-right causal mask, i.e. with the global
token positions within the sample. Both implementations take the same layout: the torch specification
``varlen_attention_ref`` and the Triton ``varlen_attention`` kernel.
"""
from __future__ import annotations

import torch

from mllm_mega.parallel.context import CPShard, gather_cp


def cp_attention(q, k, v, shard: CPShard, *, kernels: str, softmax_scale: float, causal: bool,
                 gather=gather_cp) -> torch.Tensor:
    """q (T_local, Hq, D), k/v (T_local, Hkv, D), already rotated -> (T_local, Hq, D)."""
    if causal != shard.causal:
        raise ValueError("context parallel: the shard was built for "
                         f"{'causal' if shard.causal else 'full'} attention, the layer is "
                         f"{'causal' if causal else 'full'}")
    kv = gather(torch.cat([k, v], dim=1), shard)  # (CP*T_local, 2*Hkv, D): one collective per layer
    kv = kv[shard.kv_index.to(kv.device)]
    k_sel, v_sel = kv.split(k.shape[1], dim=1)
    q_cu, kv_cu = shard.q_cu.to(q.device), shard.kv_cu.to(q.device)
    if kernels == "triton":
        from mllm_mega.kernels import varlen_attention

        return varlen_attention(q, k_sel.contiguous(), v_sel.contiguous(), q_cu, kv_cu, shard.max_q, shard.max_kv,
                                softmax_scale=softmax_scale, causal=causal)
    from mllm_mega.kernels.varlen_attention import varlen_attention_ref

    return varlen_attention_ref(q, k_sel, v_sel, q_cu, kv_cu, shard.max_q, shard.max_kv,
                                softmax_scale=softmax_scale, causal=causal)


def cp_embed(model, input_ids, shard: CPShard, pieces, grids, emb):
    """``emb`` (T_local, 1, h) of the local tokens with the merged vision features at their placeholders.

    ``pieces``/``grids``: the whole pack's pixel rows and grids (images, then videos). This rank encodes the
    media ``shard.media_rank`` gives it; the features are all-gathered (autograd-aware) and scattered by
    ``shard.feature_slot``.
    """
    from mllm_mega.models.vlm import media_token_counts

    pv, grid = (torch.cat(pieces), torch.cat(grids)) if pieces else (None, None)
    rows = grid.prod(-1).tolist() if grid is not None else []  # pixel rows of each medium
    counts = media_token_counts(model.arch, grid).tolist() if grid is not None else []  # its features
    sizes = [0] * shard.cp_size
    mine, starts = [], [0]
    for i, n in enumerate(rows):
        starts.append(starts[-1] + int(n))
        sizes[shard.media_rank[i]] += counts[i]
        if shard.media_rank[i] == shard.cp_rank:
            mine.append(i)
    slot = shard.feature_slot.to(emb.device)
    total = sum(sizes)
    if int((slot >= 0).sum()) and total == 0:
        raise ValueError("context parallel: placeholder tokens in input_ids but no image/video grids")
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in model.vision.parameters())
    if total == 0:
        return emb
    if mine:
        sel = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine]).to(pv.device)
        local = model.vision(pv[sel], grid[mine])
    else:  # nothing to encode here: an empty piece, still part of the (collective) graph
        local = emb.new_zeros((0, emb.shape[-1]), requires_grad=trainable)
    feats = gather_cp(local, shard, sizes)  # rows grouped by rank, in each rank's own media order
    order, offset = [], [sum(sizes[:r]) for r in range(shard.cp_size)]
    for i, n in enumerate(counts):  # back to pack order (images, then videos)
        r = shard.media_rank[i]
        order.append(torch.arange(offset[r], offset[r] + n))
        offset[r] += n
    feats = feats[torch.cat(order).to(feats.device)]
    emb = emb.clone()
    use = slot >= 0
    emb[use, 0] = feats[slot[use]].to(emb.dtype)
    if feats.requires_grad:
        # every rank must run the gather's backward (a collective), also one with no local placeholder
        emb = emb + 0.0 * feats.sum().to(emb.dtype)
    return emb
