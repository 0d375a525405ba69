"""From a raw WebDataset sample to a packable sample spec, with every check that does not need decoding.

A sample's fields: images ``jpg``/``png``/``webp``/``gif``/``bmp``/``tiff`` (several as ``0.jpg``, ``1.jpg``, ... or ``img0.jpg``),
video frames ``video.000.jpg``, ``video.001.jpg``, ... (several videos as ``video0.000.jpg``, ``video1...``)
or video files ``mp4`` (also webm/mkv/mov/avi; several as ``video0.mp4``, ...; decoded with PyAV),
and text: ``txt`` (a caption) or ``json`` (a LLaVA-style conversation; a json without one may carry
metadata such as ``"fps"`` next to a ``txt`` caption). Image sizes come from the file headers, so the
resized sizes, grids and token ids (placeholders expanded) are all known here, before any decoding: this is
what lets the loader pack first and decode only what it packed.

Preference pairs (tools/prepare_dataset.py --format preference, see convert.py): a ``json`` {"conversations":
<the prompt, ending with a human turn>, "chosen": str, "rejected": str} with the prompt's images as above; they are
for the preference objective: with ``DataConfig.preference`` the loader reads them with preference.py's parser
(parse_sample skips them as json_malformed: the prompt has no assistant turn).

Anything wrong raises :class:`BadSample` whose ``reason`` is the skip-count key (see SKIP_REASONS).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from mllm_mega.data.config import DataConfig
from mllm_mega.data.shards import RawSample
from mllm_mega.data.text import IMAGE, VIDEO, TextProcessor, conversation_messages, insert_vision_blocks
from mllm_mega.data.video import inspect_video, sample_indices
from mllm_mega.data.vision import TEMPORAL_PATCH_SIZE, BadSample, inspect_image, num_vision_tokens, \
    sample_frame_indices, smart_resize

SKIP_REASONS = {
    "unreadable_shard": "a shard that is not a tar archive (counted once per shard)",
    "truncated_tar": "a shard that ends early: the sample being read at the cut is lost (once per shard)",
    "image_unreadable": "not an image / unsupported format (e.g. random bytes named .jpg)",
    "image_truncated": "image data ends before its end marker",
    "image_too_small": "a side under min_image_side pixels",
    "image_aspect_ratio": "more elongated than 200:1",
    "image_decode_error": "passed the header checks but failed to decode",
    "video_error": "frames of different sizes, or an undecodable video",
    "video_unsupported": "an encoded video (mp4, ...) without PyAV installed",
    "video_not_supported": "a video under fixed-resolution image processing (images only)",
    "json_malformed": "json that does not parse or holds no valid conversation",
    "missing_text": "no txt and no json, or an empty / non-UTF-8 caption",
    "missing_image": "more <image>/<video> placeholders than images/videos",
    "unused_image": "more images/videos than placeholders",
    "placeholder_mismatch": "vision pad tokens in the text itself",
    "too_long": "longer than seq_len (and not truncatable without cutting an image)",
    "too_many_images": "more images than max_images_per_pack",
    "no_labels": "no supervised token",
    # preference pairs (DataConfig.preference; preference.py)
    "pair_missing": "no chosen or rejected completion (or one that is not a string / one assistant message)",
    "pair_empty": "an empty chosen or rejected completion",
    "pair_identical": "chosen and rejected are the same completion",
    "pair_too_long": "chosen + rejected segments longer than seq_len (a pair is never split or truncated)",
    "unexpected_error": "any other exception while reading the sample (logged with its traceback)",
}

_IMAGE_FIELD = re.compile(r"^(?:(?:img|image)?(\d+)\.)?(jpe?g|png|webp|gif|bmp|tiff?)$")
# image fields in formats we do not decode: a skip counted as image_unreadable, never a silent text-only sample
_UNSUPPORTED_IMAGE_FIELD = re.compile(r"^(?:(?:img|image)?\d+\.)?(heic|heif|avif|jp2|jxl|ico|svg)$")
_FRAME_FIELD = re.compile(r"^video(\d*)\.(\d+)\.(jpe?g|png|webp)$")
_VIDEO_FILE_FIELD = re.compile(r"^(?:video(\d*)\.)?(mp4|webm|mkv|mov|avi)$")


@dataclass
class Medium:
    """One image or video of a sample, with everything needed to decode and patchify it."""

    kind: int  # IMAGE or VIDEO
    frames: list[bytes]  # encoded image(s): one for an image, the kept frames for a video (none for a file)
    size: tuple[int, int]  # decoded (height, width)
    resized: tuple[int, int]  # smart_resize target (height, width)
    grid: tuple[int, int, int]  # (t, h, w) in 14-px patches
    second_per_grid: float = 0.0  # seconds spanned by one temporal patch (videos)
    alpha: bool = False  # decoded with PIL: transparency (composited onto white, as HF does) or a PIL-only format
    video_file: bytes | None = None  # an encoded video (mp4, ...), decoded with PyAV
    frame_indices: tuple[int, ...] = ()  # the frames of video_file to keep
    tokens: int | None = None  # LLM tokens when fixed by the image scheme (fixed_resolution.py), else from grid

    @property
    def num_tokens(self) -> int:
        return self.tokens if self.tokens is not None else num_vision_tokens(self.grid)


@dataclass
class SampleSpec:
    """A validated, tokenized sample: token ids with placeholders expanded, and its undecoded media."""

    key: str
    restore_key: list
    epoch: int
    input_ids: np.ndarray  # (L,) int64
    supervised: np.ndarray  # (L,) bool: token i is a training target
    token_types: np.ndarray  # (L,) int32: 0 text, 1 image, 2 video
    media: list[Medium] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_media(self) -> int:
        return len(self.media)


def image_fields(fields: dict[str, bytes]):
    """A sample's media: ``(images, videos)``, images as encoded bytes in field order, each video as its
    file's bytes or its list of encoded frames in frame order.

    Raises :class:`BadSample` (``image_unreadable``) for an image field of an unsupported format.
    """
    images, videos = [], {}
    for name, data in fields.items():
        m = _IMAGE_FIELD.match(name)
        if m:
            images.append((int(m.group(1)) if m.group(1) else -1, name, data))
            continue
        if _UNSUPPORTED_IMAGE_FIELD.match(name):
            raise BadSample("image_unreadable", f"unsupported image field {name!r} (supported: jpg, png, webp, "
                                                "gif, bmp, tiff)")
        m = _FRAME_FIELD.match(name)
        if m:
            videos.setdefault(int(m.group(1) or 0), []).append((int(m.group(2)), data))
            continue
        m = _VIDEO_FILE_FIELD.match(name)
        if m:
            index = int(m.group(1) or 0)
            if index in videos:
                raise BadSample("video_error", f"video {index} is given twice (frames and/or files)")
            videos[index] = data
    images = [data for _, _, data in sorted(images)]
    # a video is its sorted list of encoded frames, or the bytes of a video file
    videos = [v if isinstance(v, bytes) else [data for _, data in sorted(v)] for _, v in sorted(videos.items())]
    return images, videos


def _image_medium(data: bytes, cfg: DataConfig) -> Medium:
    info = inspect_image(data, min_side=cfg.min_image_side)
    resized = smart_resize(info.height, info.width, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return Medium(IMAGE, [data], (info.height, info.width), resized, (1, resized[0] // 14, resized[1] // 14),
                  alpha=info.decode_with_pil)


def _video_medium(frames: list[bytes], fps: float, cfg: DataConfig) -> Medium:
    keep = sample_frame_indices(len(frames), cfg.max_video_frames)
    sizes, alpha = set(), False
    for i in keep:
        try:
            info = inspect_image(frames[i], min_side=cfg.min_image_side)
        except BadSample as exc:
            raise BadSample(exc.reason, f"video frame {i}: {exc}") from None
        sizes.add((info.height, info.width))
        alpha |= info.decode_with_pil
    if len(sizes) != 1:
        raise BadSample("video_error", f"video frames have different sizes {sorted(sizes)}")
    (height, width), = sizes
    resized = smart_resize(height, width, min_pixels=cfg.video_min_pixels, max_pixels=cfg.video_max_pixels)
    grid_t = -(-len(keep) // TEMPORAL_PATCH_SIZE)
    # kept frames are spaced len(frames)/len(keep) source frames apart
    sampled_fps = fps * len(keep) / len(frames)
    return Medium(VIDEO, [frames[i] for i in keep], (height, width), resized,
                  (grid_t, resized[0] // 14, resized[1] // 14), TEMPORAL_PATCH_SIZE / sampled_fps, alpha)


def _video_file_medium(data: bytes, cfg: DataConfig) -> Medium:
    info = inspect_video(data)
    if min(info.height, info.width) < cfg.min_image_side:
        raise BadSample("image_too_small", f"{info.width}x{info.height} video has a side under "
                                           f"{cfg.min_image_side} px")
    keep = sample_indices(info.num_frames, info.fps, cfg.video_sample_fps, cfg.max_video_frames)
    try:
        resized = smart_resize(info.height, info.width, min_pixels=cfg.video_min_pixels,
                               max_pixels=cfg.video_max_pixels)
    except ValueError as exc:
        raise BadSample("image_aspect_ratio", f"video: {exc}") from None
    sampled_fps = info.fps * len(keep) / info.num_frames
    return Medium(VIDEO, [], (info.height, info.width), resized,
                  (-(-len(keep) // TEMPORAL_PATCH_SIZE), resized[0] // 14, resized[1] // 14),
                  TEMPORAL_PATCH_SIZE / sampled_fps, video_file=data, frame_indices=tuple(int(i) for i in keep))


def _fps_list(meta: dict, num_videos: int, default: float) -> list[float]:
    fps = meta.get("fps", default) if isinstance(meta, dict) else default
    fps = fps if isinstance(fps, list) else [fps] * num_videos
    if len(fps) != num_videos or not all(isinstance(f, (int, float)) and f > 0 for f in fps):
        raise BadSample("json_malformed", f"'fps' must be a positive number or one per video, got {fps!r}")
    return [float(f) for f in fps]


def parse_sample(raw: RawSample, text: TextProcessor, cfg: DataConfig, epoch: int = 0, *,
                 image_scheme=None) -> SampleSpec:
    """Validate and tokenize ``raw`` (no decoding); raises BadSample naming the skip reason.
    ``image_scheme``: None (Qwen2-VL smart_resize) or a fixed_resolution.FixedResolution."""
    fields = raw.fields
    image_data, video_frames = image_fields(fields)
    meta = None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSample("json_malformed", f"json does not parse: {exc}") from None
    is_conversation = isinstance(meta, dict) and ("conversations" in meta or "messages" in meta)
    if not is_conversation and "txt" not in fields:
        if meta is not None:
            raise BadSample("json_malformed", "json has no 'conversations' and there is no txt caption")
        raise BadSample("missing_text", "sample has neither txt nor json")

    if is_conversation:
        messages = conversation_messages(meta)
        messages = insert_vision_blocks(messages, len(image_data), len(video_frames), text)
        order = media_order_of(messages)
    else:
        order = ["image"] * len(image_data) + ["video"] * len(video_frames)

    if image_scheme is not None:
        image_scheme.check_videos(len(video_frames))
    fps = _fps_list(meta, len(video_frames), cfg.video_fps) if video_frames else []
    images = [image_scheme.image_medium(d, cfg) if image_scheme else _image_medium(d, cfg) for d in image_data]
    videos = [_video_file_medium(v, cfg) if isinstance(v, bytes) else _video_medium(v, r, cfg)
              for v, r in zip(video_frames, fps)]
    image_iter, video_iter = iter(images), iter(videos)
    media = [next(image_iter) if kind == "image" else next(video_iter) for kind in order]
    if cfg.max_images_per_pack is not None and len(media) > cfg.max_images_per_pack:
        raise BadSample("too_many_images", f"{len(media)} images/videos > max_images_per_pack "
                                           f"{cfg.max_images_per_pack}")

    if is_conversation:
        try:
            enc = text.encode_conversation(messages)
        except Exception as exc:  # jinja2 TemplateError (e.g. roles that must alternate), prefix instability
            raise BadSample("json_malformed", f"the chat template rejects this conversation: {exc}") from None
    else:
        try:
            caption = fields["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadSample("missing_text", "txt is not UTF-8") from None
        if not caption:
            raise BadSample("missing_text", "empty caption")
        enc = text.encode_caption(order, caption)
    if sum(1 for i in enc.ids if i in (text.image_token_id, text.video_token_id)) != len(media):
        raise BadSample("placeholder_mismatch", "the text itself contains vision pad tokens")
    ids, sup, types = text.expand(enc, [(m.kind, m.num_tokens) for m in media])

    if len(ids) > cfg.seq_len:
        ids, sup, types = _truncate(ids, sup, types, cfg)
    # a target at position 0 has no preceding token to predict it from
    if not sup[1:].any():
        raise BadSample("no_labels", "no supervised token")
    return SampleSpec(raw.key, raw.restore_key(), epoch, ids, sup, types, media)


def media_order_of(messages) -> list[str]:
    """Media kinds in order of their vision blocks in the rendered messages."""
    order = []
    for m in messages:
        for match in re.finditer(r"<\|(image|video)_pad\|>", m["content"]):
            order.append(match.group(1))
    return order


def _truncate(ids, sup, types, cfg: DataConfig):
    vision = np.flatnonzero(types)
    # the cut must leave every vision block whole, its <|vision_end|> (right after the pads) included
    if not cfg.truncate or (len(vision) and vision[-1] + 2 > cfg.seq_len):
        raise BadSample("too_long", f"{len(ids)} tokens > seq_len {cfg.seq_len}")
    return ids[: cfg.seq_len], sup[: cfg.seq_len], types[: cfg.seq_len]
