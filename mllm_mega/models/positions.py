"""MRoPE position ids (3 rows: temporal, height, width) as Qwen2-VL / Qwen2.5-VL define them; on text alone
all three rows are 0, 1, 2, ..., i.e. plain 1-D RoPE positions.

Follows the rule of the transformers implementation (``get_rope_index``): text tokens advance all three rows
by one; a run of image (video) placeholder tokens gets a (t, h, w) grid of positions offset by the running
position, with the temporal row scaled by ``tokens_per_second * second_per_grid_t`` for videos in Qwen2.5-VL
(the report's absolute-time alignment; Qwen2-VL uses an interval of 1), after which the running position
advances by ``max(h, w) // spatial_merge_size``. In a packed sequence positions restart for every sample,
so the packer calls :func:`sample_position_ids` once per sample and concatenates.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """0 for text, 1 for image placeholders, 2 for video placeholders (the HF processor's convention)."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _vision_positions(start: int, grid_thw: Sequence[int], spatial_merge_size: int, time_interval: float):
    t, h, w = (int(x) for x in grid_thw)
    llm_t, llm_h, llm_w = t, h // spatial_merge_size, w // spatial_merge_size
    pos_t = (torch.arange(llm_t) * time_interval).long() + start
    pos_h = torch.arange(llm_h) + start
    pos_w = torch.arange(llm_w) + start
    grid = torch.meshgrid(pos_t, pos_h, pos_w, indexing="ij")
    return torch.stack(grid, dim=0).reshape(3, -1)


def sample_position_ids(
    token_types: Sequence[int] | torch.Tensor,
    image_grids: Iterable[Sequence[int]] = (),
    video_grids: Iterable[Sequence[int]] = (),
    second_per_grid_ts: Iterable[float] | None = None,
    *,
    spatial_merge_size: int = 2,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """Position ids (3, len(token_types)) int64 of ONE sample, starting at 0.

    ``token_types`` is the sample's modality per token (see :func:`mm_token_type_ids`); ``image_grids`` /
    ``video_grids`` are the (t, h, w) patch grids of its images / videos in order of appearance.
    ``tokens_per_second`` is None for Qwen2-VL (temporal interval 1).
    """
    if isinstance(token_types, torch.Tensor):
        token_types = token_types.tolist()
    grids = {IMAGE: iter(image_grids), VIDEO: iter(video_grids)}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else None
    pieces, current = [], 0
    num_tokens = 0
    for kind, group in itertools.groupby(token_types):
        length = len(list(group))
        num_tokens += length
        if kind == TEXT:
            pieces.append(torch.arange(length).view(1, -1).expand(3, -1) + current)
            current += length
            continue
        try:
            grid = next(grids[kind])
        except StopIteration:
            name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
            raise ValueError(f"more {name[:5]} placeholder runs than entries in {name}") from None
        interval = 1.0
        if kind == VIDEO and tokens_per_second is not None:
            second = next(seconds) if seconds is not None else 1.0
            interval = tokens_per_second * float(second)
        pos = _vision_positions(current, grid, spatial_merge_size, interval)
        if pos.shape[1] != length:
            raise ValueError(
                f"a run of {length} vision placeholder tokens does not match grid {tuple(int(x) for x in grid)} "
                f"({pos.shape[1]} tokens after {spatial_merge_size}x{spatial_merge_size} merging)"
            )
        pieces.append(pos)
        current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).long()


def get_rope_index(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: float | None = None,
) -> torch.Tensor:
    """Position ids (3, batch, seq) for a padded batch of HF processor inputs (left or right padding).

    Grids are consumed in order across the batch, as the HF processor lays them out. Padding positions get 0.
    """
    batch, seq = input_ids.shape
    out = torch.zeros(3, batch, seq, dtype=torch.long)
    types = mm_token_type_ids(input_ids, image_token_id, video_token_id)
    image_iter = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    video_iter = iter(video_grid_thw.tolist() if video_grid_thw is not None else [])
    second_iter = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
    for b in range(batch):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(seq, dtype=torch.bool)
        row_types = types[b][keep]
        runs = [k for k, _ in itertools.groupby(row_types.tolist())]
        n_img, n_vid = runs.count(IMAGE), runs.count(VIDEO)
        images = list(itertools.islice(image_iter, n_img))
        videos = list(itertools.islice(video_iter, n_vid))
        seconds = list(itertools.islice(second_iter, n_vid)) if second_per_grid_ts is not None else None
        pos = sample_position_ids(
            row_types, images, videos, seconds,
            spatial_merge_size=spatial_merge_size, tokens_per_second=tokens_per_second,
        )
        out[:, b, keep] = pos
    return out


def sequential_position_ids(token_types: Sequence[int] | torch.Tensor, image_grids: Iterable = (),
                            video_grids: Iterable = (), second_per_grid_ts: Iterable[float] | None = None, *,
                            spatial_merge_size: int = 2, tokens_per_second: float | None = None) -> torch.Tensor:
    """1-D positions 0..n-1 over every token, vision placeholders included, as three equal rows (3, n): for a
    family whose LLM uses plain RoPE (same signature as :func:`sample_position_ids`, grids unused)."""
    n = len(token_types)
    return torch.arange(n, dtype=torch.long).view(1, -1).expand(3, -1).contiguous()

