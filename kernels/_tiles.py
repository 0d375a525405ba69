"""Flat tile schedules for variable-length (packed) kernels, cached per ``cu_seqlens`` tensor.

A packed batch is a list of segments given by ``cu_seqlens`` (int32, (num_segments + 1,)). Instead of a
grid padded to the longest segment, each kernel launches over a flat list of (segment, block) tiles, the
way FLA's ``prepare_chunk_indices`` does. The list is built with a few device-side torch ops (no host
sync): its length is the upper bound ``cdiv(total, block) + num_segments`` and the unused tail is marked
with segment -1, where the kernel returns at once. Tiles are ordered heaviest first (longest-processing-
time order) so that under causal masking the long diagonal-far tiles start in the first wave.

The model builds ``cu_seqlens`` once per micro-batch and passes the same tensor to every layer, so the
schedule is cached by tensor identity (guarded by a weak reference and the tensor's version counter,
so an in-place edit or a new tensor that reuses a freed id never sees a stale schedule).
"""
from __future__ import annotations

import weakref

import torch

# One entry per live cu_seqlens tensor: {key: tiles}; entries die with their tensor.
_CACHE: dict[int, tuple[weakref.ref, dict]] = {}


def _evict(key_id: int):
    def _cb(_ref):
        _CACHE.pop(key_id, None)

    return _cb


def build_tiles(cu_blocked: torch.Tensor, cu_other: torch.Tensor, block: int, num_rows: int, work: str):
    """(2, max_tiles) int32: row 0 the segment (-1 for unused), row 1 the block index inside it.

    ``cu_blocked`` is cut into ``block``-sized tiles; ``cu_other`` gives the length of the dimension the
    tile loops over (keys for a query tile and vice versa), used only to order tiles by work.
    ``work`` is "full" (non-causal), "causal_q" (query tiles, bottom-right causal) or "causal_k" (key
    tiles, bottom-right causal). ``num_rows`` is the total size of the blocked dimension.
    """
    device = cu_blocked.device
    num_segments = cu_blocked.numel() - 1
    max_tiles = (num_rows + block - 1) // block + num_segments
    if num_segments <= 0 or max_tiles == 0:
        return torch.full((2, max(max_tiles, 1)), -1, dtype=torch.int32, device=device)
    lens = (cu_blocked[1:] - cu_blocked[:-1]).long()  # (num_segments,)
    other = (cu_other[1:] - cu_other[:-1]).long()  # (num_segments,)
    n_tiles = (lens + block - 1) // block
    cu_tiles = torch.cumsum(n_tiles, 0)
    idx = torch.arange(max_tiles, device=device)
    seg = torch.searchsorted(cu_tiles, idx, right=True)  # (max_tiles,)
    valid = seg < num_segments
    seg_c = seg.clamp(max=num_segments - 1)
    blk = idx - (cu_tiles[seg_c] - n_tiles[seg_c])
    len_s, other_s = lens[seg_c], other[seg_c]
    if work == "full":
        cost = other_s
    elif work == "causal_q":  # keys visible to the tile's last row: (blk + 1) * block + (len_k - len_q)
        cost = torch.minimum(other_s, (blk + 1) * block + (other_s - len_s)).clamp(min=0)
    elif work == "causal_k":  # query rows that see the tile's first key: len_q - (blk * block - (len_k - len_q))
        cost = other_s - (blk * block - (len_s - other_s)).clamp(min=0, max=None).minimum(other_s)
    else:
        raise ValueError(f"work must be 'full', 'causal_q' or 'causal_k', got {work!r}")
    cost = torch.where(valid, cost, torch.full_like(cost, -1))
    order = torch.argsort(cost, descending=True, stable=True)
    tiles = torch.stack([torch.where(valid, seg, torch.full_like(seg, -1)), blk])[:, order]
    return tiles.to(torch.int32).contiguous()


def cached_tiles(cu_blocked: torch.Tensor, cu_other: torch.Tensor, block: int, num_rows: int, work: str):
    """``build_tiles`` memoized on the identity and version of both cu_seqlens tensors."""
    entry = _CACHE.get(id(cu_blocked))
    if entry is None or entry[0]() is not cu_blocked:
        entry = (weakref.ref(cu_blocked, _evict(id(cu_blocked))), {})
        _CACHE[id(cu_blocked)] = entry
    per_tensor = entry[1]
    key = (id(cu_other), cu_blocked._version, cu_other._version, block, num_rows, work)
    hit = per_tensor.get(key)
    if hit is not None and hit[0]() is cu_other:
        return hit[1]
    tiles = build_tiles(cu_blocked, cu_other, block, num_rows, work)
    if len(per_tensor) > 64:  # a tensor edited in place many times: drop stale versions
        per_tensor.clear()
    per_tensor[key] = (weakref.ref(cu_other), tiles)
    return tiles
