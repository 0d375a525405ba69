"""Model FLOPs of the real work in a packed micro-batch: ViT + merger + LLM, padding excluded.

Counted per module as forward matmul FLOPs (2 per multiply-add) including attention over each sample's own
segment (causal pairs in the LLM; per-frame and per-window segments in the ViT, as the model computes them),
times a training multiplier that follows what the backward pass really does:

    forward 1 + weight gradients 1 (module trainable) + input gradients 1 (a trainable module lies before it)

so a stage-1 step (only the merger trains) counts the ViT once and the LLM twice. Megatron-Bridge's VLM
TFLOP/s counts padded tokens and omits the ViT; here padding is never counted and the ViT always is.
"""
from __future__ import annotations

import torch

from mllm_mega.models.qwen2_vl.configuration import ModelArch
from mllm_mega.models.qwen2_vl.vision import frame_cu_seqlens, window_partition

# bf16 dense peak per device, for MFU (H100/H200 SXM: 989 TFLOP/s; A100: 312)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def _seg_lens(cu: torch.Tensor) -> list[int]:
    return (cu[1:] - cu[:-1]).tolist()


def llm_forward_flops(arch: ModelArch, segment_lens: list[int], *, causal: bool = True) -> dict[str, float]:
    """{"linear": ..., "attention": ...} forward FLOPs of the LLM on packed samples of these lengths.

    ``causal`` counts the attended (query, key) pairs, n(n+1)/2 per sample; False counts n^2 (what a kernel
    that computes the full score matrix performs).
    """
    t = arch.text
    hd, tokens = t.head_dim, sum(segment_lens)
    per_token = (2 * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * hd  # linear_qkv
                 + 2 * t.num_heads * hd * t.hidden_size                      # linear_proj
                 + 2 * 3 * t.hidden_size * t.ffn_hidden_size)                # gated MLP
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in segment_lens)
    attention = 4 * pairs * t.num_heads * hd  # QK^T and AV
    head = 2 * t.hidden_size * t.vocab_size * tokens
    return {"linear": float(t.num_layers * per_token * tokens + head), "attention": float(t.num_layers * attention)}


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


def training_multipliers(frozen: dict[str, bool]) -> dict[str, int]:
    """FLOP multiplier per module (vision, merger, llm) for a training step; see the module docstring."""
    out, upstream_trains = {}, False
    for module in ("vision", "merger", "llm"):
        trains = not frozen[module]
        out[module] = 1 + int(trains) + int(upstream_trains)
        upstream_trains = upstream_trains or trains
    return out


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


def device_peak_tflops(configured: float | None) -> float | None:
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
