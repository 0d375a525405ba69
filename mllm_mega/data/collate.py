"""One packed micro-batch (THD layout) from several preprocessed samples.

Samples are concatenated and padded to exactly ``seq_len`` tokens (a constant shape, which pipeline p2p
and sequence parallelism need). ``cu_seqlens`` has one segment per sample plus the padding as its own final
segment, so no sample attends to another and padding attends only to itself. Labels are shifted per sample
(``labels[i]`` is the target of position i; -100 at each sample's last token, on unsupervised targets and
on padding), MRoPE position ids restart at 0 for every sample (padding gets 0), and the per-token loss
weights follow InternVL2.5's reweighting: 1 (token), 1/n (sample) or 1/sqrt(n) (square), n = the sample's
number of supervised labels, for loss = sum(w * l) / sum(w).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mllm_mega.data.samples import SampleSpec
from mllm_mega.data.text import IMAGE, VIDEO
from mllm_mega.data.vision import PATCH_DIM
from mllm_mega.kernels.cross_entropy import loss_weights
from mllm_mega.models.positions import sample_position_ids

IGNORE_INDEX = -100


@dataclass
class ProcessedSample:
    """A sample spec with its media turned into patches (one array per medium, in order)."""

    spec: SampleSpec
    patches: list[np.ndarray]  # (num_patches_m, 1176) float32 per medium


def shifted_labels(input_ids: np.ndarray, supervised: np.ndarray) -> np.ndarray:
    """labels[i] = input_ids[i + 1] where token i + 1 is supervised, else -100; the last position is -100."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(supervised[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def collate_pack(samples: list[ProcessedSample], seq_len: int, *, loss_reweighting: str = "token",
                 pad_token_id: int = 0, spatial_merge_size: int = 2,
                 tokens_per_second: float | None = None, position_ids_fn=None, patch_dim: int | None = None) -> dict:
    """The micro-batch dict (CPU tensors) of one pack; see the module docstring and loader.py.

    ``position_ids_fn`` (the model family's, ``sample_position_ids``'s signature) gives one sample's (3, n)
    position ids; None = MRoPE (:func:`mllm_mega.models.positions.sample_position_ids`). ``patch_dim``: the
    width of ``pixel_values`` rows when a pack has no image (None = the Qwen2-VL 1176)."""
    position_ids_fn = position_ids_fn or sample_position_ids
    total = sum(s.spec.length for s in samples)
    if total > seq_len:
        raise ValueError(f"pack of {total} tokens exceeds seq_len {seq_len}")
    input_ids = np.full(seq_len, pad_token_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    position_ids = torch.zeros(3, seq_len, dtype=torch.int64)
    cu = [0]
    image_patches, image_grids, video_patches, video_grids, seconds = [], [], [], [], []
    for s in samples:
        spec, start = s.spec, cu[-1]
        end = start + spec.length
        input_ids[start:end] = spec.input_ids
        labels[start:end] = shifted_labels(spec.input_ids, spec.supervised)
        imgs = [(m, p) for m, p in zip(spec.media, s.patches) if m.kind == IMAGE]
        vids = [(m, p) for m, p in zip(spec.media, s.patches) if m.kind == VIDEO]
        position_ids[:, start:end] = position_ids_fn(
            torch.from_numpy(spec.token_types), [m.grid for m, _ in imgs], [m.grid for m, _ in vids],
            [m.second_per_grid for m, _ in vids], spatial_merge_size=spatial_merge_size,
            tokens_per_second=tokens_per_second)
        for m, p in imgs:
            image_patches.append(p)
            image_grids.append(m.grid)
        for m, p in vids:
            video_patches.append(p)
            video_grids.append(m.grid)
            seconds.append(m.second_per_grid)
        cu.append(end)
    if cu[-1] < seq_len:
        cu.append(seq_len)  # padding: its own segment, attending only to itself
    cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    labels_t = torch.from_numpy(labels)

    def cat(parts, width=PATCH_DIM):
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, width)

    def grids(parts):
        return torch.tensor(parts, dtype=torch.int64).reshape(-1, 3)

    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": labels_t,
        "loss_weights": loss_weights(labels_t, cu_seqlens, loss_reweighting),
        "position_ids": position_ids,
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
        "pixel_values": cat(image_patches, patch_dim or PATCH_DIM),
        "image_grid_thw": grids(image_grids),
        "pixel_values_videos": cat(video_patches),
        "video_grid_thw": grids(video_grids),
        "second_per_grid_ts": torch.tensor(seconds, dtype=torch.float32),
        "num_real_tokens": total,
        "num_samples": len(samples),
        "num_images": len(image_grids),
        "num_videos": len(video_grids),
        "sample_keys": [s.spec.key for s in samples],
    }
