"""Encoded videos (mp4, webm, mkv, mov, avi) on the CPU with PyAV: header probing, frame sampling, decoding.

Frames are sampled as in qwen-vl-utils / transformers' Qwen2-VL video processor with an fps target: about
``sample_fps`` frames per second of video (Qwen2.5-VL trains at 2), at least 4 and at most ``max_frames``,
rounded down to a multiple of the temporal patch size 2, uniformly spaced (``arange(0, n, n / k)``). The
frame count and size come from the container header, so the token count is known before decoding.
PyAV is optional: without it encoded videos are skipped as ``video_unsupported``.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from mllm_mega.data.vision import TEMPORAL_PATCH_SIZE, BadSample

try:
    import av

    HAVE_AV = True
except ImportError:
    HAVE_AV = False

MIN_FRAMES = 4  # the HF video processor's min_frames


@dataclass(frozen=True)
class VideoInfo:
    height: int
    width: int
    num_frames: int
    fps: float


def inspect_video(data: bytes) -> VideoInfo:
    """Size, frame count and frame rate from the container header (no frame is decoded)."""
    if not HAVE_AV:
        raise BadSample("video_unsupported", "encoded video needs PyAV (pip install av)")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise BadSample("video_error", "container has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.base_rate or 0)
            frames = int(stream.frames or 0)
            if frames == 0 and stream.duration and fps:
                frames = int(round(float(stream.duration * stream.time_base) * fps))
            info = VideoInfo(int(stream.codec_context.height), int(stream.codec_context.width), frames, fps)
    except BadSample:
        raise
    except Exception as exc:  # PyAV raises its own error hierarchy (av.error.*) on bad containers
        raise BadSample("video_error", f"cannot read video header: {exc}") from None
    if info.num_frames < 1 or info.fps <= 0 or min(info.height, info.width) < 1:
        raise BadSample("video_error", f"video header without frames, rate or size: {info}")
    return info


def sample_indices(num_frames: int, fps: float, sample_fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames to keep (the HF video processor's fps rule)."""
    cap = max(1, math.floor(min(max_frames, num_frames) / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE)
    keep = num_frames / fps * sample_fps
    keep = min(max(keep, MIN_FRAMES), cap, num_frames)
    keep = max(math.floor(keep / TEMPORAL_PATCH_SIZE) * TEMPORAL_PATCH_SIZE, min(num_frames, 1))
    return np.arange(0, num_frames, num_frames / keep).astype(np.int64)[:keep]


def decode_frames(data: bytes, indices) -> np.ndarray:
    """The frames at ``indices`` as uint8 (len(indices), H, W, 3) RGB; raises BadSample("video_error")."""
    wanted = {int(i) for i in indices}
    frames = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for n, frame in enumerate(container.decode(video=0)):
                if n in wanted:
                    frames[n] = frame.to_ndarray(format="rgb24")
                if len(frames) == len(wanted):
                    break
    except Exception as exc:  # av.error.* on corrupt streams
        raise BadSample("video_error", f"cannot decode video: {exc}") from None
    missing = sorted(wanted - frames.keys())
    if missing:
        raise BadSample("video_error", f"video has fewer frames than its header says (no frame {missing[0]})")
    return np.stack([frames[int(i)] for i in indices])
