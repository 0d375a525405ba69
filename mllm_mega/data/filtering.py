"""Dataset filtering over WebDataset shards: rule filters and an image-text score filter.

As the seed reports describe: InternVL2.5 drops samples whose text repeats itself (an n-gram repetition
filter) and applies heuristic rules; Qwen2.5-VL cleans with rule-based filters; Open-Qwen2VL keeps the
image-text pairs a CLIP/SigLIP model scores highest. One pass reads every sample in shard order and gives it
the first reason that drops it:

- ``unreadable_sample``      no usable text (no txt, no conversation) or an unreadable image header
- ``text_too_short`` / ``text_too_long``   word count outside [min_words, max_words]
- ``repetitive_text``        n-gram repetition ratio 1 - unique / total word n-grams above max_ngram_repeat
- ``image_too_small`` / ``image_aspect_ratio``   a side under min_side, or more elongated than max_aspect
- ``duplicate_image``        an image whose bytes equal an image of an earlier kept sample
- ``near_duplicate_image``   an image whose 64-bit difference hash (dHash) is within phash_distance bits of one
                             of an earlier kept sample
- ``low_score``              image-text similarity under min_score, or outside the keep_top fraction

Kept samples are copied byte for byte into shards of the same names under the output directory, with
``report.json`` (counts by reason, settings, score statistics). Deterministic: the same input and settings
keep the same samples.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np

from mllm_mega.data.preference import completion_text
from mllm_mega.data.samples import image_fields
from mllm_mega.data.shards import RawSample, iter_shard, list_shards, write_shard
from mllm_mega.data.text import conversation_messages
from mllm_mega.data.vision import BadSample, inspect_image

REASONS = ("unreadable_sample", "text_too_short", "text_too_long", "repetitive_text", "image_too_small",
           "image_aspect_ratio", "duplicate_image", "near_duplicate_image", "low_score")


@dataclass
class FilterConfig:
    """Settings of :func:`filter_dataset` (None disables a rule)."""

    min_words: int | None = 1
    max_words: int | None = None
    ngram: int = 3
    """Word n-gram size of the repetition ratio."""
    max_ngram_repeat: float | None = 0.5
    """Drop when 1 - unique/total n-grams exceeds this (0 = every n-gram distinct; near 1 = one phrase looped)."""
    min_side: int | None = 10
    max_aspect: float | None = 200.0
    dedup_exact: bool = True
    phash_distance: int | None = 4
    """Near-duplicate images: dHash Hamming distance at most this many of 64 bits."""
    score_model: str | None = None
    """A CLIP or SigLIP directory (transformers' AutoModel + AutoTokenizer + AutoImageProcessor)."""
    min_score: float | None = None
    """Keep samples whose cosine similarity is at least this (needs score_model)."""
    keep_top: float | None = None
    """Keep this fraction of the scored samples, the highest scores (needs score_model)."""
    batch_size: int = 32
    device: str = "auto"

    def __post_init__(self):
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram}")
        if self.max_ngram_repeat is not None and not 0.0 <= self.max_ngram_repeat <= 1.0:
            raise ValueError(f"max_ngram_repeat must be in [0, 1], got {self.max_ngram_repeat}")
        if self.phash_distance is not None and not 0 <= self.phash_distance < 64:
            raise ValueError(f"phash_distance must be in [0, 63], got {self.phash_distance}")
        if self.keep_top is not None and not 0.0 < self.keep_top <= 1.0:
            raise ValueError(f"keep_top must be in (0, 1], got {self.keep_top}")
        if (self.min_score is not None or self.keep_top is not None) and not self.score_model:
            raise ValueError("min_score / keep_top need score_model (a CLIP or SigLIP directory)")
        if self.score_model and self.min_score is None and self.keep_top is None:
            raise ValueError("score_model given without min_score or keep_top: nothing would be filtered")


# --- rules ---------------------------------------------------------------------------------------------
def sample_text(fields: dict[str, bytes]) -> str | None:
    """The text a filter judges: the txt caption, else for a preference pair (json with ``chosen`` and
    ``rejected``) its chosen completion, else the assistant turns of the json conversation."""
    if "txt" in fields:
        try:
            return fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"])
            if isinstance(meta, dict) and "chosen" in meta and "rejected" in meta:
                return completion_text(meta, "chosen").strip()
            messages = conversation_messages(meta)
        except (ValueError, BadSample):
            return None
        return "\n".join(m["content"] for m in messages if m["role"] == "assistant").strip()
    return None


def ngram_repetition(text: str, n: int = 3) -> float:
    """1 - unique / total word n-grams (0 when there are fewer words than n)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def dhash(data: bytes) -> int:
    """64-bit difference hash: a 9x8 greyscale thumbnail, one bit per horizontally adjacent pair."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).reshape(-1)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


class NearDuplicateIndex:
    """Hashes within ``distance`` bits of an added one, by the pigeonhole principle: split the 64 bits into
    distance + 1 bands; two hashes that close agree exactly on at least one band, so only the hashes sharing
    a band value are compared."""

    def __init__(self, distance: int):
        self.distance = distance
        bands = distance + 1
        edges = [round(i * 64 / bands) for i in range(bands + 1)]
        self.bands = list(zip(edges[:-1], edges[1:]))
        self.buckets: list[dict[int, list[int]]] = [{} for _ in self.bands]

    def _keys(self, h: int):
        for i, (lo, hi) in enumerate(self.bands):
            yield i, (h >> lo) & ((1 << (hi - lo)) - 1)

    def near(self, h: int) -> bool:
        return any(bin(h ^ other).count("1") <= self.distance
                   for i, key in self._keys(h) for other in self.buckets[i].get(key, ()))

    def add(self, h: int) -> None:
        for i, key in self._keys(h):
            self.buckets[i].setdefault(key, []).append(h)


@dataclass
class _Verdict:
    key: str
    shard: str
    reason: str | None = None
    text: str = ""
    first_image: bytes | None = None
    score: float | None = None
    hashes: list = field(default_factory=list)


def rule_reason(raw: RawSample, cfg: FilterConfig) -> tuple[str | None, str, list[bytes]]:
    """(drop reason or None, the sample's text, its images) from the rules that need no other sample."""
    text = sample_text(raw.fields)
    try:
        images, _ = image_fields(raw.fields)
    except BadSample:
        return "unreadable_sample", text or "", []
    if text is None or (not text and not images):
        return "unreadable_sample", "", images
    words = len(text.split())
    if cfg.min_words is not None and words < cfg.min_words:
        return "text_too_short", text, images
    if cfg.max_words is not None and words > cfg.max_words:
        return "text_too_long", text, images
    if cfg.max_ngram_repeat is not None and ngram_repetition(text, cfg.ngram) > cfg.max_ngram_repeat:
        return "repetitive_text", text, images
    for data in images:
        try:
            info = inspect_image(data)
        except BadSample as exc:  # more elongated than 200:1 is refused by smart_resize whatever max_aspect says
            return (exc.reason if exc.reason in REASONS else "unreadable_sample"), text, images
        if cfg.min_side is not None and min(info.height, info.width) < cfg.min_side:
            return "image_too_small", text, images
        if cfg.max_aspect is not None and max(info.height, info.width) / min(info.height, info.width) > cfg.max_aspect:
            return "image_aspect_ratio", text, images
    return None, text, images


# --- model score ---------------------------------------------------------------------------------------
class ImageTextScorer:
    """Cosine similarity of image and text embeddings from a CLIP or SigLIP directory (transformers)."""

    def __init__(self, path: str, device: str = "auto"):
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"score_model {path!r}: no config.json (expected a CLIP or SigLIP directory)")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        for method in ("get_image_features", "get_text_features"):
            if not hasattr(self.model, method):
                raise ValueError(f"score_model {path!r} ({type(self.model).__name__}) has no {method}: "
                                 "expected a CLIP or SigLIP model")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        config = self.model.config
        self.max_length = getattr(getattr(config, "text_config", config), "max_position_embeddings", 64)

    def __call__(self, images: list[bytes], texts: list[str]) -> list[float]:
        import torch
        from PIL import Image

        from mllm_mega.data.vision import decode_image_pil

        pil = [Image.fromarray(decode_image_pil(data)) for data in images]
        with torch.no_grad():
            pixel = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            img = self.model.get_image_features(pixel_values=pixel)
            txt = self.model.get_text_features(**{k: v for k, v in tokens.items() if k != "token_type_ids"})
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
        return (img * txt).sum(-1).cpu().tolist()


# --- the pass --------------------------------------------------------------------------------------------
def filter_dataset(data, out: str, cfg: FilterConfig, *, scorer=None, progress: bool = True) -> dict:
    """Filter the shards ``data`` into ``out`` (must not exist or be empty); returns the report.

    ``scorer(images, texts) -> scores`` overrides the model built from ``cfg.score_model`` (tests, custom
    scores). Output is written to a temporary directory next to ``out`` and renamed when complete.
    """
    from tqdm import tqdm

    shards = list_shards(data)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory")
    if scorer is None and cfg.score_model:
        scorer = ImageTextScorer(cfg.score_model, cfg.device)
    verdicts: list[_Verdict] = []
    seen_exact: set[bytes] = set()
    near = NearDuplicateIndex(cfg.phash_distance) if cfg.phash_distance is not None else None
    counts = dict.fromkeys(REASONS, 0)
    bar = tqdm(desc="filtering", unit="sample", disable=not (progress and sys.stderr.isatty()))
    for shard in shards:
        for raw, _ in iter_shard(shard):
            bar.update(1)
            reason, text, images = rule_reason(raw, cfg)
            v = _Verdict(raw.key, shard, reason, text, images[0] if images else None)
            if reason is None:
                digests = [hashlib.sha256(d).digest() for d in images] if cfg.dedup_exact else []
                phashes = [dhash(d) for d in images] if near is not None else []
                if any(d in seen_exact for d in digests):
                    v.reason = "duplicate_image"
                elif any(near.near(h) for h in phashes):
                    v.reason = "near_duplicate_image"
                else:  # only kept samples' images count as seen: a dropped sample removes nothing else
                    seen_exact.update(digests)
                    for h in phashes:
                        near.add(h)
            verdicts.append(v)
    bar.close()
    score_stats = None
    if scorer is not None:
        todo = [v for v in verdicts if v.reason is None and v.first_image is not None]
        for start in tqdm(range(0, len(todo), cfg.batch_size), desc="scoring", unit="batch",
                          disable=not (progress and sys.stderr.isatty())):
            batch = todo[start:start + cfg.batch_size]
            for v, s in zip(batch, scorer([v.first_image for v in batch], [v.text for v in batch])):
                v.score = float(s)
        scores = np.array([v.score for v in todo], dtype=np.float64)
        threshold = cfg.min_score
        if cfg.keep_top is not None and len(todo):
            keep = max(1, int(round(cfg.keep_top * len(todo))))
            # the keep-th highest score; ties at the boundary go to the earlier samples (stable order)
            order = sorted(range(len(todo)), key=lambda i: (-scores[i], i))
            kept_top = set(order[:keep])
            for i, v in enumerate(todo):
                if i not in kept_top:
                    v.reason = "low_score"
        if threshold is not None:
            for v in todo:
                if v.reason is None and v.score < threshold:
                    v.reason = "low_score"
        score_stats = {"scored": len(todo), "min": float(scores.min()) if len(todo) else None,
                       "mean": float(scores.mean()) if len(todo) else None,
                       "max": float(scores.max()) if len(todo) else None}
    for v in verdicts:
        if v.reason is not None:
            counts[v.reason] += 1
    kept_keys = {(v.shard, v.key) for v in verdicts if v.reason is None}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        written = 0
        for shard in shards:
            keep = [(raw.key, raw.fields) for raw, _ in iter_shard(shard) if (shard, raw.key) in kept_keys]
            if keep:
                written += write_shard(os.path.join(tmp, os.path.basename(shard)), keep)
        report = {"input_samples": len(verdicts), "kept": written, "dropped": {k: c for k, c in counts.items() if c},
                  "settings": asdict(cfg), "score": score_stats,
                  "dropped_samples": [[os.path.basename(v.shard), v.key, v.reason] for v in verdicts if v.reason]}
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
