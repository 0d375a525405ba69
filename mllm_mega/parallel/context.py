"""Context parallelism (CP) for packed (THD) sequences: the split, its index, and autograd-aware gathers.

Each packed sample (segment of ``cu_seqlens``) of length L is padded at its tail to P = 2*CP*c tokens and
cut into 2*CP chunks of c tokens; CP rank r holds chunks r and 2*CP-1-r (the load-balanced layout of
Megatron-LM / TransformerEngine: under causal masking chunk j costs ~j, so every rank gets (2*CP-1) units).
Padding sits after a sample's real tokens, so causal attention never lets a real token see it, and no real
token is dropped: ``index`` maps every local slot back to its token in the unsplit pack (-1 = padding).

K/V exchange: one all-gather per layer over the CP group (exact and simple; :class:`CPShard.kv_index` then
picks, for each local chunk, the key prefix it may see). A ring that overlaps the exchange with compute
would hide the communication on GPUs; with GQA the gathered K/V are small (7B: 4 KV heads x 128 x 2
tensors x bf16 = 2 KiB per token, 64 MiB for 32k tokens per layer), so all-gather was chosen first.

The ViT runs once per image: grid rows (images, then videos) are assigned to CP ranks (largest first, to the
least-loaded rank); each rank encodes its own and the merged features are all-gathered (autograd-aware: the
backward sums every rank's gradient of a feature and keeps its own) before the embedding scatter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

IGNORE_INDEX = -100


@dataclass
class CPShard:
    """What one CP rank holds of one packed micro-batch, and how its attention finds the keys it needs."""

    cp_size: int
    cp_rank: int
    group: object  # the CP process group (None in single-process tests, with a gather function passed)
    index: torch.Tensor  # (T_local,) int64: token index in the unsplit pack, -1 = padding
    cu_seqlens: torch.Tensor  # (S+1,) int32 local segment bounds (each = chunk r then chunk 2CP-1-r)
    max_seqlen: int
    q_cu: torch.Tensor  # (2S+1,) int32 bounds of the local chunks
    kv_index: torch.Tensor  # (K,) int64 rows of the CP-gathered (CP*T_local) keys, one block per chunk
    kv_cu: torch.Tensor  # (2S+1,) int32 bounds of those key blocks
    max_q: int
    max_kv: int
    padded_len: int  # T' = CP * T_local
    causal: bool = True
    media_rank: list[int] = field(default_factory=list)  # CP rank that encodes each grid row
    feature_slot: torch.Tensor | None = None  # (T_local,) int64 row of the global merged features, -1 none

    @property
    def local_len(self) -> int:
        return int(self.index.numel())


def padded_length(cu_seqlens, cp_size: int) -> int:
    """T' before any layout padding: every non-empty segment rounded up to a multiple of 2*CP."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return sum(-(-n // (2 * cp_size)) * 2 * cp_size for n in lens)


def target_length(cu_list, cp_size: int, multiple: int = 1) -> int:
    """Smallest T' >= every pack's padded length with T'/CP divisible by ``multiple`` (TP under sequence
    parallelism) and the extra padding segment divisible by 2*CP; one value for all micro-batches of a step
    keeps pipeline p2p shapes constant."""
    step = math.lcm(2 * cp_size, cp_size * multiple)
    need = max(padded_length(cu, cp_size) for cu in cu_list)
    return -(-need // step) * step


def make_shard(cu_seqlens, cp_size: int, cp_rank: int, *, target_len: int | None = None, multiple: int = 1,
               group=None, causal: bool = True) -> CPShard:
    """The CP split of one pack (see the module docstring); ``target_len`` (default: the smallest valid)
    adds a trailing padding segment so T' equals it."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context parallel: rank {cp_rank} outside CP size {cp_size}")
    cu = [int(x) for x in cu_seqlens.tolist()]
    target = target_len if target_len is not None else target_length([cu_seqlens], cp_size, multiple)
    base = padded_length(cu_seqlens, cp_size)
    extra = target - base
    if extra < 0 or extra % (2 * cp_size) or (target // cp_size) % multiple:
        raise ValueError(f"context parallel: target length {target} cannot hold the pack (padded {base}) split "
                         f"over CP={cp_size} with a local length divisible by {multiple}")
    segs = [(s, e - s) for s, e in zip(cu[:-1], cu[1:]) if e > s]
    if extra:
        segs.append((cu[-1], -extra))  # negative length: a pure padding segment of `extra` tokens
    two = 2 * cp_size
    local_len = target // cp_size
    pieces, cu_local, q_cu, kv_pieces, kv_cu = [], [0], [0], [], [0]
    for start, length in segs:
        real = max(length, 0)
        c = (abs(length) + two - 1) // two
        seg_local = cu_local[-1]
        for j in (cp_rank, two - 1 - cp_rank):
            off = torch.arange(j * c, (j + 1) * c)
            pieces.append(torch.where(off < real, start + off, torch.full_like(off, -1)))
            q_cu.append(q_cu[-1] + c)
            # the keys chunk j may see: its sample's prefix [0, (j+1)c) when causal (bottom-right aligned: query
            # j*c+i sees keys <= j*c+i, so the tail padding stays invisible), the real tokens otherwise
            kpos = torch.arange((j + 1) * c if causal else real)
            kj = kpos // c
            owner = torch.where(kj < cp_size, kj, two - 1 - kj)
            within = torch.where(kj < cp_size, kpos % c, c + kpos % c)
            kv_pieces.append(owner * local_len + seg_local + within)
            kv_cu.append(kv_cu[-1] + kpos.numel())
        cu_local.append(seg_local + 2 * c)
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    assert index.numel() == local_len, (index.numel(), local_len)
    seg_lens = [b - a for a, b in zip(cu_local[:-1], cu_local[1:])]
    qc = torch.tensor(q_cu, dtype=torch.int32)
    kc = torch.tensor(kv_cu, dtype=torch.int32)
    return CPShard(
        cp_size=cp_size, cp_rank=cp_rank, group=group, index=index,
        cu_seqlens=torch.tensor(cu_local, dtype=torch.int32), max_seqlen=max(seg_lens, default=0),
        q_cu=qc, kv_index=torch.cat(kv_pieces) if kv_pieces else torch.zeros(0, dtype=torch.long), kv_cu=kc,
        max_q=int((qc[1:] - qc[:-1]).max()) if len(q_cu) > 1 else 0,
        max_kv=int((kc[1:] - kc[:-1]).max()) if len(kv_cu) > 1 else 0,
        padded_len=target, causal=causal,
    )


def assign_media(sizes: list[int], cp_size: int) -> list[int]:
    """CP rank of each medium (its encoder cost ~ ``sizes``): largest first, to the least-loaded rank."""
    load = [0] * cp_size
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(cp_size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out


def shard_batch(mb: dict, shard: CPShard, *, image_token_id: int, video_token_id: int,
                merge_unit: int) -> dict:
    """This CP rank's slice of a collated micro-batch: tokens, labels, loss weights and MRoPE/1-D position
    ids taken with the same index (padding: token 0, label -100, weight 0, position 0); vision inputs stay
    whole (each rank encodes its assigned media). Adds ``context_parallel`` (the shard)."""
    idx = shard.index
    real = idx >= 0
    src = idx.clamp(min=0)
    out = dict(mb)
    ids = mb["input_ids"]
    out["input_ids"] = torch.where(real, ids[src], torch.zeros_like(idx))
    if "labels" in mb:
        out["labels"] = torch.where(real, mb["labels"][src], torch.full_like(idx, IGNORE_INDEX))
    if "loss_weights" in mb:
        w = mb["loss_weights"]
        out["loss_weights"] = torch.where(real, w[src], torch.zeros((), dtype=w.dtype))
    pos = mb["position_ids"]
    out["position_ids"] = torch.where(real, pos[..., src], torch.zeros((), dtype=pos.dtype))
    out["cu_seqlens"] = shard.cu_seqlens
    out["max_seqlen"] = shard.max_seqlen
    # the merged-feature row each local placeholder takes (images first, then videos, in pack order)
    is_img, is_vid = ids == image_token_id, ids == video_token_id
    num_img = int(is_img.sum())
    slot = torch.full_like(ids, -1)
    slot[is_img] = torch.arange(num_img)
    slot[is_vid] = num_img + torch.arange(int(is_vid.sum()))
    shard.feature_slot = torch.where(real, slot[src], torch.full_like(idx, -1))
    sizes = []
    for kind, key, count in (("image", "image_grid_thw", num_img), ("video", "video_grid_thw", int(is_vid.sum()))):
        g = mb.get(key)
        if mb.get("pixel_values" if kind == "image" else "pixel_values_videos") is None:
            g = None  # grids without pixels carry no features (as in the unsplit embedding)
        found = [int(n) // merge_unit for n in g.prod(-1).tolist()] if g is not None and g.numel() else []
        if sum(found) != count:
            raise ValueError(f"{count} {kind} placeholder tokens in input_ids but {key} gives {sum(found)} "
                             "merged tokens")
        sizes += found
    shard.media_rank = assign_media(sizes, shard.cp_size)
    out["context_parallel"] = shard
    return out


def unshard_tokens(local: torch.Tensor, shards_gathered: torch.Tensor, indices: torch.Tensor,
                   num_tokens: int) -> torch.Tensor:
    """(CP*T_local, ...) gathered rows + (CP*T_local,) indices -> (num_tokens, ...) in pack order."""
    out = local.new_zeros((num_tokens, *shards_gathered.shape[1:]))
    real = indices >= 0
    out[indices[real]] = shards_gathered[real]
    return out


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 0 of per-rank pieces of ``sizes[r]`` rows; backward: sum over ranks, own rows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        width = max(sizes)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        sizes, rank = ctx.sizes, ctx.rank
        grad = grad.contiguous()
        if len(set(sizes)) == 1:
            out = grad.new_empty((sizes[0], *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)  # gloo: cpu_compat's all-reduce + slice
            return out, None, None, None
        grad = grad.clone()  # the incoming gradient may be shared: reduce a copy
        dist.all_reduce(grad, group=ctx.group)
        start = sum(sizes[:rank])
        return grad[start:start + sizes[rank]].clone(), None, None, None


def gather_cp(x: torch.Tensor, shard: CPShard, sizes: list[int] | None = None) -> torch.Tensor:
    """Autograd-aware all-gather over the CP group (equal pieces unless ``sizes`` are given)."""
    sizes = sizes or [int(x.shape[0])] * shard.cp_size
    return _GatherCP.apply(x, list(sizes), shard.cp_rank, shard.group)


def cp_group_and_rank():
    """(group, rank, size) of this rank's context-parallel group in megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    return (ps.get_context_parallel_group(), ps.get_context_parallel_rank(),
            ps.get_context_parallel_world_size())


def shard_microbatches(microbatches: list[dict], cp_size: int, cp_rank: int, group, *, multiple: int,
                       image_token_id: int, video_token_id: int, merge_unit: int) -> list[dict]:
    """Every micro-batch of a step split for this CP rank, all to one padded length (constant p2p shapes
    under pipeline parallelism; ``multiple`` = TP under sequence parallelism)."""
    target = target_length([mb["cu_seqlens"] for mb in microbatches], cp_size, multiple)
    return [shard_batch(mb, make_shard(mb["cu_seqlens"], cp_size, cp_rank, target_len=target, multiple=multiple,
                                       group=group),
                        image_token_id=image_token_id, video_token_id=video_token_id, merge_unit=merge_unit)
            for mb in microbatches]


def media_kwargs(arch) -> dict:
    """The placeholder ids and merge unit :func:`shard_batch` needs, for any family (text-only: none match)."""
    vision = getattr(arch, "vision", None)
    if vision is None:
        return {"image_token_id": -1, "video_token_id": -1, "merge_unit": 1}
    if not hasattr(vision, "spatial_merge_size"):  # a fixed pool (open_qwen2vl): counts are not h*w / unit
        raise ValueError(f"context parallel (parallel.cp > 1) is not supported for family {arch.family!r}: its "
                         "vision tokens per image are not a patch count over a merge unit")
    return {"image_token_id": arch.image_token_id, "video_token_id": arch.video_token_id,
            "merge_unit": vision.spatial_merge_size ** 2}
