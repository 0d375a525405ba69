"""Random multimodal inputs in the HF processor's format, for parity checks (``verify``) and tests.

Cases cover what parity must hold for: text only; one image; several images of different sizes whose grids
leave partial windows; a video with ``second_per_grid_ts``; a batch of two sequences of different lengths
(right padding).
"""
from __future__ import annotations

import torch

from mllm_mega.models.qwen2_vl.configuration import ModelArch

CASES = ("text", "image", "multi_image", "video", "batch")


def _vision_tokens(arch: ModelArch, grid, token_id):
    n = grid[0] * grid[1] * grid[2] // arch.vision.spatial_merge_size ** 2
    return [arch.vision_start_token_id] + [token_id] * n + [arch.vision_end_token_id or arch.vision_start_token_id]


def random_inputs(arch: ModelArch, case: str, seed: int = 0) -> dict:
    """A dict of HF processor outputs (plus ``mm_token_type_ids``) for ``case`` in :data:`CASES`."""
    if case not in CASES:
        raise ValueError(f"unknown inputs case {case!r}; expected one of {CASES}")
    g = torch.Generator().manual_seed(seed)
    text_vocab = min(arch.image_token_id, arch.video_token_id, arch.vision_start_token_id)

    def text(n):
        return torch.randint(0, text_vocab, (n,), generator=g).tolist()

    images, videos, seconds, rows = [], [], [], []
    if case == "text":
        rows = [text(23)]
    elif case == "image":
        images = [(1, 8, 12)]
        rows = [text(5) + _vision_tokens(arch, images[0], arch.image_token_id) + text(7)]
    elif case == "multi_image":
        # 10x6 and 14x20 patches: merged grids 5x3 and 7x10 leave partial 4x4 windows.
        images = [(1, 10, 6), (1, 14, 20), (1, 4, 4)]
        row = text(3)
        for grid in images:
            row += _vision_tokens(arch, grid, arch.image_token_id) + text(4)
        rows = [row]
    elif case == "video":
        videos, seconds = [(3, 6, 8)], [1.5]
        rows = [text(4) + _vision_tokens(arch, videos[0], arch.video_token_id) + text(9)]
    elif case == "batch":
        images = [(1, 6, 6), (1, 4, 8)]
        rows = [text(4) + _vision_tokens(arch, images[0], arch.image_token_id) + text(11),
                text(2) + _vision_tokens(arch, images[1], arch.image_token_id) + text(3)]
    seq = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), seq, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r)
        attention_mask[i, :len(r)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    patch_dim = arch.vision.patch_dim
    if images:
        grid = torch.tensor(images, dtype=torch.long)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
        out["image_grid_thw"] = grid
    if videos:
        grid = torch.tensor(videos, dtype=torch.long)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
        out["video_grid_thw"] = grid
        out["second_per_grid_ts"] = torch.tensor(seconds)
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == arch.image_token_id] = 1
    types[input_ids == arch.video_token_id] = 2
    out["mm_token_type_ids"] = types
    return out
