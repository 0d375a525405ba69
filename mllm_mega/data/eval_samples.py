"""Held-out caption samples for generation at evaluation (the trainer's captioning eval).

Each single-image caption sample of the eval shards becomes the prompt the model was trained to caption
after (the image's vision block, placeholders expanded), its pixel values (decoded with PIL, no
augmentation: identical to the HF processor's) and MRoPE positions, and the true caption to score against.
"""
from __future__ import annotations

import torch

from mllm_mega.data.config import DataConfig
from mllm_mega.data.fixed_resolution import image_scheme
from mllm_mega.data.samples import parse_sample
from mllm_mega.data.shards import iter_shard, list_shards
from mllm_mega.data.text import IMAGE, Encoded, TextProcessor
from mllm_mega.data.vision import BadSample, decode_image_pil, image_to_patches, resize_pil
from mllm_mega.models.positions import sample_position_ids


def build_eval_samples(cfg: DataConfig, *, path: str | list[str] | None = None, max_samples: int | None = None,
                       spatial_merge_size: int = 2, position_ids_fn=None, **image_options) -> list[dict]:
    """Held-out caption samples for generation: one dict per single-image caption sample.

    Keys: ``key``, ``pixel_values`` (P, 1176) float32 ((P, 3*p*p) when fixed), ``image_grid_thw`` (1, 3) int64,
    ``input_ids`` (L,) int64 (the caption prompt, placeholders expanded), ``position_ids`` (3, L) int64, ``caption`` str.
    Images are decoded with PIL and not augmented; bad samples are skipped (as in training). ``image_options``:
    the image scheme, as build_train_loader's (``image_processing="fixed"``, ...: fixed_resolution.py).
    """
    path = path if path is not None else cfg.eval_data_path
    if not path:
        raise ValueError("build_eval_samples needs a path or DataConfig.eval_data_path")
    text = TextProcessor(cfg.tokenizer_dir)
    scheme = image_scheme(**image_options, position_ids_fn=position_ids_fn, spatial_merge_size=spatial_merge_size)
    resize, to_patches = (scheme.resize, scheme.image_to_patches) if scheme else (resize_pil, image_to_patches)
    out = []
    for shard in list_shards(path):
        for raw, _ in iter_shard(shard):
            if max_samples is not None and len(out) >= max_samples:
                return out
            try:
                spec = parse_sample(raw, text, cfg, image_scheme=scheme)
                if "txt" not in raw.fields or [m.kind for m in spec.media] != [IMAGE]:
                    continue
                medium = spec.media[0]
                image = resize(decode_image_pil(medium.frames[0]), *medium.resized)
            except (BadSample, OSError, ValueError):
                continue
            pixel_values, grid = to_patches(image, spatial_merge_size)
            ids, _, types = text.expand(
                _prompt_encoding(text), [(IMAGE, medium.num_tokens)])
            out.append({
                "key": raw.key,
                "pixel_values": torch.from_numpy(pixel_values),
                "image_grid_thw": torch.tensor([grid], dtype=torch.int64),
                "input_ids": torch.from_numpy(ids),
                "position_ids": (position_ids_fn or sample_position_ids)(
                    torch.from_numpy(types), [grid], spatial_merge_size=spatial_merge_size),
                "caption": raw.fields["txt"].decode("utf-8").strip(),
            })
    return out


def _prompt_encoding(text: TextProcessor):
    prompt = text.caption_prompt(["image"])
    return Encoded(prompt, [False] * len(prompt))
