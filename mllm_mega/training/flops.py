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

from mllm_mega.models import registry
from mllm_mega.models.registry import MODULE_GROUPS

# bf16 dense peak per device, for MFU (H100/H200 SXM: 989 TFLOP/s; A100: 312)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def training_multipliers(frozen: dict[str, bool]) -> dict[str, int]:
    """FLOP multiplier per module (vision, merger, llm) for a training step; see the module docstring."""
    out, upstream_trains = {}, False
    for module in MODULE_GROUPS:
        trains = not frozen[module]
        out[module] = 1 + int(trains) + int(upstream_trains)
        upstream_trains = upstream_trains or trains
    return out


def pack_flops(arch, pack: dict, multipliers: dict[str, int]) -> float:
    """Training FLOPs of one pack (as returned by the loader), counting only its real tokens (the family's
    count, through the registry)."""
    return registry.spec_of(arch).pack_flops(arch, pack, multipliers)


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
