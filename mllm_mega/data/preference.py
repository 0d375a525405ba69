"""Preference pairs (DPO / MPO data): one WebDataset sample -> one packing unit of two attention-isolated segments.

A preference sample is an SFT sample whose ``json`` holds the prompt conversation (``messages`` or
``conversations``, the SFT schema, ending with the user turn) plus ``chosen`` and ``rejected``: the two
assistant completions, each a string or a list holding one assistant message
(``[{"role": "assistant", "content": str}]``, TRL's conversational form); the media are the sample's fields as
for SFT (see samples.py). With ``DataConfig.preference`` the loader reads these (tools/prepare_dataset.py
--format preference and tools/make_synthetic_dataset.py --preference write them).

Each completion is tokenized as the SFT conversation prompt + that completion (:func:`parse_sample`, so the
media, placeholder and chat-template checks are the SFT ones), the prompt tokens of both must be identical,
and only the final completion is supervised (earlier assistant turns of a multi-turn prompt are context).
The pair is ONE packing unit (:class:`PairSpec`): its length is both segments' lengths and its media count is
the pair's media once, so FFD can never split it across packs, and the collate puts chosen then rejected
next to each other. The ViT runs once per pair: the pack holds every pair's media once and
``image_feature_index`` / ``video_feature_index`` send both segments' placeholders to the same feature rows.

Pack keys beyond the SFT ones (collate.py), P = pairs in the pack:
    pair_segments (P, 2) int64       indices into the cu_seqlens segments of each pair's chosen and rejected
    pair_keys list[str]              the pair's sample key (for precomputed reference log-probs)
    image_feature_index (N_img,)     for each image placeholder token, in order, its row of the image features
                                     (the ViT output of this pack's pixel_values); video_feature_index likewise
                                     for video placeholders, rows of the video features. Absent for a pack
                                     without images (videos).
``sample_keys`` / ``num_samples`` count pairs; ``labels`` cover both completions; ``loss_weights`` are the SFT
weights (data.loss_reweighting) on the chosen completion and 0 on the rejected segment.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import torch

from mllm_mega.data.collate import ProcessedSample, collate_pack
from mllm_mega.data.config import DataConfig
from mllm_mega.data.samples import SampleSpec, parse_sample
from mllm_mega.data.shards import RawSample
from mllm_mega.data.text import IMAGE, VIDEO, TextProcessor
from mllm_mega.data.vision import PATCH_DIM, BadSample

# the skip reasons of preference samples, listed with the others in samples.SKIP_REASONS
PAIR_REASONS = ("pair_missing", "pair_empty", "pair_identical", "pair_too_long")


@dataclass
class PairSpec(SampleSpec):
    """A preference pair as one packable unit: ``input_ids`` etc. are the chosen segment then the rejected one
    (so ``length`` is both, for the packer); ``media`` the pair's media once."""

    chosen_length: int = 0

    def segments(self) -> tuple[SampleSpec, SampleSpec]:
        """(chosen, rejected) as SFT sample specs sharing the pair's media."""
        n = self.chosen_length
        return tuple(SampleSpec(self.key, self.restore_key, self.epoch, self.input_ids[s], self.supervised[s],
                                self.token_types[s], self.media) for s in (slice(0, n), slice(n, None)))


def completion_text(meta: dict, name: str) -> str:
    """The ``chosen`` / ``rejected`` completion of a pair's json: a string or one assistant message (BadSample
    pair_missing / pair_empty otherwise)."""
    value = meta.get(name)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role", value[0].get("from")) in ("assistant", "gpt"):
        value = value[0].get("content", value[0].get("value"))
    if value is None or not isinstance(value, str):
        got = "no key" if name not in meta else type(meta[name]).__name__
        raise BadSample("pair_missing", f"{name!r} must be a string or one assistant message, got {got}")
    if not value.strip():
        raise BadSample("pair_empty", f"{name!r} is empty")
    return value


def parse_preference_sample(raw: RawSample, text: TextProcessor, cfg: DataConfig, epoch: int = 0, *,
                            image_scheme=None) -> PairSpec:
    """Validate and tokenize a preference sample (no decoding); raises BadSample naming the skip reason."""
    if "json" not in raw.fields:
        raise BadSample("pair_missing", "a preference sample needs a json with the prompt, chosen and rejected")
    try:
        meta = json.loads(raw.fields["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("json_malformed", f"json does not parse: {exc}") from None
    if not isinstance(meta, dict):
        raise BadSample("json_malformed", "sample json is not an object")
    chosen, rejected = completion_text(meta, "chosen"), completion_text(meta, "rejected")
    if chosen.strip() == rejected.strip():
        raise BadSample("pair_identical", "chosen and rejected are the same completion")
    key = "conversations" if "conversations" in meta else "messages"
    prompt = meta.get(key)
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
            or prompt[-1].get("from", prompt[-1].get("role")) not in ("human", "user"):
        raise BadSample("json_malformed", f"the prompt ({key!r}) must be a list of turns ending with a user turn")
    segments = []
    for completion in (chosen, rejected):
        sft = {k: v for k, v in meta.items() if k not in ("chosen", "rejected", "conversations", "messages")}
        sft[key] = copy.deepcopy(prompt) + [{"from": "gpt", "role": "assistant", "value": completion,
                                             "content": completion}]
        one = dataclasses.replace(raw, fields={**raw.fields, "json": json.dumps(sft).encode()})
        try:
            spec = parse_sample(one, text, cfg, epoch, image_scheme=image_scheme)
        except BadSample as exc:
            if exc.reason == "too_long":
                raise BadSample("pair_too_long", f"a segment alone: {exc}") from None
            raise
        segments.append(spec)
    (c, r) = segments
    starts = [_completion_start(s.supervised) for s in segments]
    if starts[0] != starts[1] or not np.array_equal(c.input_ids[:starts[0]], r.input_ids[:starts[1]]):
        raise BadSample("json_malformed", "the chat template renders different prompts for chosen and rejected")
    if c.length + r.length > cfg.seq_len:
        raise BadSample("pair_too_long", f"chosen {c.length} + rejected {r.length} tokens > seq_len {cfg.seq_len}")
    sup = [s.supervised.copy() for s in segments]
    for s, start in zip(sup, starts):
        s[:start] = False  # only the completion is a target: a multi-turn prompt's assistant turns are context
    return PairSpec(raw.key, c.restore_key, epoch, np.concatenate([c.input_ids, r.input_ids]),
                    np.concatenate(sup), np.concatenate([c.token_types, r.token_types]), c.media,
                    chosen_length=c.length)


def _completion_start(supervised: np.ndarray) -> int:
    """Start of the last run of supervised tokens: the final assistant turn (the completion)."""
    last = int(np.flatnonzero(supervised)[-1])
    before = np.flatnonzero(~supervised[:last])
    return int(before[-1]) + 1 if len(before) else 0


def collate_preference_pack(samples: list[ProcessedSample], seq_len: int, **kwargs) -> dict:
    """The micro-batch of a pack of pairs (``samples[i].spec`` a :class:`PairSpec`); keys in the module docstring.

    ``kwargs``: those of :func:`~mllm_mega.data.collate.collate_pack` (reweighting, pad id, positions)."""
    segments = []
    for s in samples:
        chosen, rejected = s.spec.segments()
        # the rejected segment's media come from the chosen one's: no patches of its own
        segments += [ProcessedSample(chosen, s.patches),
                     ProcessedSample(rejected, [np.zeros((0, p.shape[1] if p.ndim == 2 else PATCH_DIM), np.float32)
                                                for p in s.patches])]
    batch = collate_pack(segments, seq_len, **kwargs)
    cu = batch["cu_seqlens"]
    for p in range(len(samples)):  # the rejected segments are not in the SFT (generation) term
        batch["loss_weights"][int(cu[2 * p + 1]):int(cu[2 * p + 2])] = 0.0
    unit = kwargs.get("spatial_merge_size", 2) ** 2
    vision = {IMAGE: ([], [], []), VIDEO: ([], [], [])}  # kind -> (grids, feature index pieces, seconds)
    for s in samples:
        for kind, (grids, index, seconds) in vision.items():
            rows = [m.tokens if m.tokens is not None else m.grid[0] * m.grid[1] * m.grid[2] // unit
                    for m in s.spec.media if m.kind == kind]  # LLM tokens (= feature rows) of each medium
            base = sum(len(piece) for piece in index) // 2
            own = np.arange(base, base + sum(rows), dtype=np.int64)
            index += [own, own]  # chosen's placeholders, then rejected's: the same feature rows
            grids += [m.grid for m in s.spec.media if m.kind == kind]
            seconds += [m.second_per_grid for m in s.spec.media if m.kind == kind]
    for kind, grid_key, index_key in ((IMAGE, "image_grid_thw", "image_feature_index"),
                                      (VIDEO, "video_grid_thw", "video_feature_index")):
        grids, index, seconds = vision[kind]
        batch[grid_key] = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
        if grids:
            batch[index_key] = torch.from_numpy(np.concatenate(index))
    batch["second_per_grid_ts"] = torch.tensor(vision[VIDEO][2], dtype=torch.float32)
    batch["num_images"], batch["num_videos"] = len(vision[IMAGE][0]), len(vision[VIDEO][0])
    batch["num_samples"] = len(samples)
    batch["sample_keys"] = batch["pair_keys"] = [s.spec.key for s in samples]
    batch["pair_segments"] = torch.arange(2 * len(samples), dtype=torch.int64).reshape(-1, 2)
    return batch


def sample_functions(cfg: DataConfig):
    """The loader's (parse, collate) pair: SFT samples, or preference pairs when ``cfg.preference``."""
    if cfg.preference:
        return parse_preference_sample, collate_preference_pack
    return parse_sample, collate_pack
