"""Forward FLOPs of a Qwen2-VL-style model (NaViT ViT + merger + Qwen2 LLM) on one pack: the family's
``pack_flops``. See :mod:`mllm_mega.training.flops` for the counting rules and the training multipliers."""
from __future__ import annotations

import torch

from mllm_mega.models.llms.qwen import llm_forward_flops as _llm_flops
from mllm_mega.models.qwen2_vl.configuration import ModelArch
from mllm_mega.models.encoders.qwen2_vit import frame_cu_seqlens, window_partition


def _seg_lens(cu: torch.Tensor) -> list[int]:
    return (cu[1:] - cu[:-1]).tolist()


def llm_forward_flops(arch: ModelArch, segment_lens: list[int], *, causal: bool = True) -> dict[str, float]:
    """The LLM's forward FLOPs on packed samples of these lengths (see :func:`llms.qwen.llm_forward_flops`)."""
    return _llm_flops(arch.text, segment_lens, causal=causal)


def vision_forward_flops(arch: ModelArch, grid_thw: torch.Tensor | None) -> dict[str, float]:
    """{"linear", "attention", "merger"} forward FLOPs of the ViT and merger for the images of ``grid_thw``."""
    if grid_thw is None or grid_thw.numel() == 0:
        return {"linear": 0.0, "attention": 0.0, "merger": 0.0}
    v = arch.vision
    grid_thw = grid_thw.cpu()
    patches = int(grid_thw.prod(-1).sum())
    mlp = (6 if v.gated_mlp else 4) * v.hidden_size * v.ffn_hidden_size
    per_patch = 2 * v.hidden_size * 3 * v.hidden_size + 2 * v.hidden_size * v.hidden_size + mlp
    full_sq = sum(n * n for n in _seg_lens(frame_cu_seqlens(grid_thw)))
    if v.window_size:
        units = v.window_size // v.patch_size // v.spatial_merge_size
        window_sq = sum(n * n for n in _seg_lens(window_partition(grid_thw, v.spatial_merge_size, units)[1]))
        num_full = len(v.fullatt_block_indexes)
    else:
        window_sq, num_full = 0, v.depth
    attention = 4 * v.hidden_size * (num_full * full_sq + (v.depth - num_full) * window_sq)
    linear = 2 * v.patch_dim * v.hidden_size * patches + v.depth * per_patch * patches
    unit = v.spatial_merge_size ** 2
    merged_width = v.hidden_size * unit
    merger = (patches // unit) * (2 * merged_width * merged_width + 2 * merged_width * v.out_hidden_size)
    return {"linear": float(linear), "attention": float(attention), "merger": float(merger)}


def pack_flops(arch: ModelArch, pack: dict, multipliers: dict[str, int]) -> float:
    """Training FLOPs of one pack (as returned by the loader), counting only its real tokens."""
    lens, real, kept = _seg_lens(pack["cu_seqlens"]), int(pack["num_real_tokens"]), []
    for n in lens:  # samples first, then the padding segment
        if sum(kept) >= real:
            break
        kept.append(n)
    vit, merger = 0.0, 0.0
    for key in ("image_grid_thw", "video_grid_thw"):
        f = vision_forward_flops(arch, pack.get(key))
        vit, merger = vit + f["linear"] + f["attention"], merger + f["merger"]
    llm = sum(llm_forward_flops(arch, kept).values())
    return multipliers["vision"] * vit + multipliers["merger"] * merger + multipliers["llm"] * llm
