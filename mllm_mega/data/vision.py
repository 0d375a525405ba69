"""NaViT image/video preprocessing of Qwen2-VL / Qwen2.5-VL, written to match transformers' processor exactly.

The Qwen2-VL report's native-resolution ViT sees each image at (about) its own size: ``smart_resize`` rounds
height and width to multiples of 28 (patch 14 x merge 2) inside [min_pixels, max_pixels], the image is
resized with bicubic filtering, rescaled to [0, 1], normalized with the CLIP mean/std and cut into 14x14
patches, each patch repeated over the temporal patch size 2, laid out so the 2x2 patches that the merger
fuses are contiguous. ``pixel_values`` rows are 3 * 2 * 14 * 14 = 1176 floats; ``image_grid_thw`` is
(1, H/14, W/14) and the LLM sees t*h*w/4 placeholder tokens per image.

The reference is ``transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil``
(PIL bicubic on uint8, float64 rescale cast to float32, float32 normalize); :func:`normalize_patchify`
repeats those operations in the same order so the result is bit-identical (tests/data/test_vision.py).

Also here: reading an image's size from its header without decoding it (so a sample's token count, and
hence packing, is known before any decoding), cheap truncation checks, and the per-image JPEG
augmentation parameters derived from (seed, epoch, key, index) instead of a running RNG (exact resume).
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mllm_mega.data.shards import stable_hash

try:  # csrc/patchify.cpp: the one-pass image_to_patches; the numpy path below is its specification
    from mllm_mega import _patchify
except ImportError:  # an environment built before the extension existed: rebuild (tools/setup_env.sh)
    _patchify = None

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
MAX_ASPECT_RATIO = 200  # smart_resize refuses anything more elongated
# OpenAI CLIP statistics, as in transformers.image_utils.OPENAI_CLIP_MEAN / _STD
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
RESCALE = 1 / 255

IMAGE_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"}
# decoded with PIL on every backend, so both backends give the same pixels: GIF (DALI has no GIF decoder; the
# first frame is used, as transformers' load_image does), BMP and TIFF (rare; PIL's reading is the reference)
PIL_ONLY_FORMATS = {"GIF", "BMP", "TIFF"}
# PIL names a JPEG with a multi-picture (MPF) segment, as most phone cameras write, "MPO": it is a baseline
# JPEG whose first picture is the primary image, which is what both PIL and DALI decode
FORMAT_ALIASES = {"MPO": "JPEG"}
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class BadSample(Exception):
    """A sample that must be skipped; ``reason`` is the skip-count key."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the area in [min_pixels, max_pixels].

    Rounds each side to the nearest multiple; if the area is then too large, scales both sides down by
    sqrt(area / max_pixels) and floors; if too small, scales up by sqrt(min_pixels / area) and ceils.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image sides must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_vision_tokens(grid_thw, merge_size: int = MERGE_SIZE) -> int:
    """LLM placeholder tokens of one image/video: t * h * w / merge_size**2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // (merge_size * merge_size)


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded data never contains 0xFFD9 (0xFF is always stuffed), so a complete JPEG has an EOI
    # marker after its last start-of-scan; a truncated one does not. An EXIF thumbnail's EOI comes earlier.
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.find(b"\xff\xd9", sos + 2) >= 0


def _png_complete(data: bytes) -> bool:
    return data.rstrip(b"\x00")[-8:] == b"IEND\xaeB`\x82"


def _webp_complete(data: bytes) -> bool:
    return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)


def _gif_complete(data: bytes) -> bool:
    return data.rstrip(b"\x00")[-1:] == b";"  # the GIF trailer


def _bmp_complete(data: bytes) -> bool:
    return len(data) >= 6 and int.from_bytes(data[2:6], "little") <= len(data)


_COMPLETE = {"JPEG": _jpeg_complete, "PNG": _png_complete, "WEBP": _webp_complete, "GIF": _gif_complete,
             "BMP": _bmp_complete, "TIFF": lambda data: True}  # TIFF: no end marker; decoding catches a cut


def _orientation(img: Image.Image, fmt: str) -> int:
    """The EXIF orientation both decoders apply (PIL's exif_transpose, DALI), read without decoding pixels."""
    if fmt == "TIFF":
        return int(img.getexif().get(EXIF_ORIENTATION, 1))  # a tag of the TIFF directory itself
    raw = img.info.get("exif")  # JPEG APP1, WebP EXIF chunk, PNG eXIf chunk (before the image data)
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return int(exif.get(EXIF_ORIENTATION, 1))


@dataclass(frozen=True)
class ImageInfo:
    """What an image header says: decoded size (EXIF rotation applied), format, transparency."""

    height: int
    width: int
    format: str
    has_alpha: bool

    @property
    def decode_with_pil(self) -> bool:
        """Transparency (composited onto white, as HF does) or a format only PIL decodes here."""
        return self.has_alpha or self.format in PIL_ONLY_FORMATS


def inspect_image(data: bytes, *, min_side: int = 1, max_aspect_ratio: float | None = MAX_ASPECT_RATIO) -> ImageInfo:
    """Read and check an encoded image's header without decoding the pixels.

    Raises :class:`BadSample` with reason ``image_unreadable`` (not an image, or an unsupported format),
    ``image_truncated`` (missing end marker), ``image_too_small`` (a side under ``min_side``) or
    ``image_aspect_ratio`` (more elongated than 200:1, which smart_resize refuses; None: no limit).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = FORMAT_ALIASES.get(img.format, img.format), img.size
                orientation = _orientation(img, fmt) if fmt in IMAGE_FORMATS else 1
                has_alpha = _has_alpha(img)
    except Exception as exc:  # PIL raises many types for garbage (UnidentifiedImageError, SyntaxError, ...)
        raise BadSample("image_unreadable", f"cannot read image header: {exc}") from None
    if fmt not in IMAGE_FORMATS:
        raise BadSample("image_unreadable", f"unsupported image format {fmt}")
    if not _COMPLETE[fmt](data):
        raise BadSample("image_truncated", f"{fmt} data ends before its end marker ({len(data)} bytes)")
    if orientation in TRANSPOSED_ORIENTATIONS:
        height, width = width, height
    if min(height, width) < min_side:
        raise BadSample("image_too_small", f"{width}x{height} image has a side under {min_side} px")
    if max_aspect_ratio is not None and max(height, width) / min(height, width) > max_aspect_ratio:
        raise BadSample("image_aspect_ratio", f"{width}x{height} image is more elongated than {max_aspect_ratio}:1")
    return ImageInfo(height, width, fmt, has_alpha)


def probe_image(data: bytes, *, min_side: int = 1) -> tuple[int, int]:
    """(height, width) of an encoded image as it will be decoded, from its header (see inspect_image)."""
    info = inspect_image(data, min_side=min_side)
    return info.height, info.width


HIGH_BIT_GREY_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # 16-bit grey, or PIL's 32-bit view of it


def _has_alpha(img: Image.Image) -> bool:
    # transformers' convert_to_rgb rule: an alpha band, or a palette/grey image with a transparent colour
    return "A" in img.getbands() or img.info.get("transparency") is not None


def decode_image_pil(data: bytes) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB, EXIF rotation applied, transparency composited onto white.

    This is what the HF processor makes of the image (its convert_to_rgb composites onto white); DALI
    decodes opaque images identically, images with transparency are always decoded here.
    16-bit greyscale (PNG/TIFF) is scaled to 8 bits as round(v / 257), as DALI does; PIL's own
    ``convert("RGB")`` (and so the HF processor given such a PIL image) clips every value above 255 to white.
    16-bit RGB PNGs are read by PIL as their high bytes, which is DALI's rounding within one level.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in HIGH_BIT_GREY_MODES:
            grey = np.round(np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
            return np.repeat(grey[:, :, None], 3, axis=2)
        if _has_alpha(img):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
        return np.asarray(img.convert("RGB"))


def jpeg_quality_for(seed: int, epoch: int, key: str, index: int, prob: float,
                     quality_range: tuple[int, int]) -> int | None:
    """JPEG re-compression quality for one image, or None for no augmentation (InternVL2.5's recipe).

    Derived from a hash of (seed, epoch, sample key, image index) so it is the same after a resume and
    independent of batch composition, worker count or decode order.
    """
    if prob <= 0:
        return None
    h = stable_hash("jpeg", seed, epoch, key, index)
    if (h & 0xFFFFFFFF) / 2**32 >= prob:
        return None
    low, high = quality_range
    return low + (h >> 32) % (high - low + 1)


def resize_pil(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 (H, W, 3) with PIL, as transformers' PIL backend does."""
    if image.shape[:2] == (height, width):
        # PIL's resize to the same size is an identity copy; skip the round trip
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.BICUBIC))


def normalize(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 CLIP-normalized, with the processor's exact arithmetic.

    transformers rescales in float64 then casts to float32, then subtracts/divides in float32.
    """
    scaled = (frames.astype(np.float64) * RESCALE).astype(np.float32)
    return (scaled - CLIP_MEAN) / CLIP_STD


# Every uint8 value of every channel, normalized with the processor's exact arithmetic (normalize above): a
# lookup gives bit-identical values in one gather, instead of float64/float32 passes over the whole image.
_NORMALIZED = normalize(np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1))  # (256, 3) float32
# one contiguous table per channel: np.take through a contiguous table, into a contiguous buffer, with no index
# check (a uint8 index is always in range), is about 3x faster than fancy indexing a strided column
_CHANNEL_TABLES = [np.ascontiguousarray(_NORMALIZED[:, c]) for c in range(3)]
_TABLES = np.ascontiguousarray(_NORMALIZED.T)  # (3, 256) for the C++ path


def patchify(frames: np.ndarray, merge_size: int = MERGE_SIZE) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalized float32 frames (T, H, W, 3), T a multiple of 2, -> (T/2 * H/14 * W/14, 1176) and (t, h, w).

    Row order: temporal group, then merge blocks row-major, then the 2x2 patches inside a block; each row
    is laid out (channel, frame, patch row, patch column), as the Qwen2-VL processors do.
    """
    num_frames, height, width, channels = frames.shape
    if num_frames % TEMPORAL_PATCH_SIZE or height % (PATCH_SIZE * merge_size) or width % (PATCH_SIZE * merge_size):
        raise ValueError(f"frames of shape {frames.shape} are not divisible into patches")
    grid_t, grid_h, grid_w = num_frames // TEMPORAL_PATCH_SIZE, height // PATCH_SIZE, width // PATCH_SIZE
    x = frames.reshape(grid_t, TEMPORAL_PATCH_SIZE, grid_h // merge_size, merge_size, PATCH_SIZE,
                       grid_w // merge_size, merge_size, PATCH_SIZE, channels)
    # (gt, T, bh, mh, ph, bw, mw, pw, C) -> (gt, bh, bw, mh, mw, C, T, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(grid_t * grid_h * grid_w, -1), (grid_t, grid_h, grid_w)


def _lookup(rows: np.ndarray, frames_per_row: int) -> np.ndarray:
    """uint8 patch rows (N, 3 * k), columns channel-major, -> normalized float32 (N, 3 * frames_per_row * k),
    each channel's k values written ``frames_per_row`` times (a still image's two identical frames)."""
    n, k = rows.shape[0], rows.shape[1] // 3
    grouped = rows.reshape(n, 3, k)
    out = np.empty((n, 3, frames_per_row, k), np.float32)
    values = np.empty((n, k), np.float32)  # contiguous: np.take into a strided ``out`` view is buffered and slow
    for c in range(3):
        np.take(_CHANNEL_TABLES[c], grouped[:, c], out=values, mode="clip")  # one gather through the table
        for f in range(frames_per_row):
            out[:, c, f] = values
    return out.reshape(n, -1)


def image_to_patches(resized: np.ndarray, merge_size: int = MERGE_SIZE):
    """One resized uint8 (H, W, 3) image -> ``pixel_values`` rows and its (1, h, w) grid.

    Bit-identical to ``patchify(normalize(two copies of the image))`` (tests/data/test_vision.py): each byte goes
    through the lookup table into both frames. The C++ extension does it in one pass (about 4x faster than
    :func:`image_to_patches_numpy`, the same values).
    """
    height, width, channels = resized.shape
    if height % (PATCH_SIZE * merge_size) or width % (PATCH_SIZE * merge_size):
        raise ValueError(f"image of shape {resized.shape} is not divisible into patches")
    if _patchify is None or resized.dtype != np.uint8 or channels != 3:
        return image_to_patches_numpy(resized, merge_size)
    rows = _patchify.image_to_patches(np.ascontiguousarray(resized), _TABLES, PATCH_SIZE, merge_size,
                                      TEMPORAL_PATCH_SIZE)
    return rows, (1, height // PATCH_SIZE, width // PATCH_SIZE)


def image_to_patches_numpy(resized: np.ndarray, merge_size: int = MERGE_SIZE):
    """:func:`image_to_patches` in numpy: the bytes of one frame are rearranged, then looked up into both."""
    height, width, channels = resized.shape
    if height % (PATCH_SIZE * merge_size) or width % (PATCH_SIZE * merge_size):
        raise ValueError(f"image of shape {resized.shape} is not divisible into patches")
    gh, gw = height // PATCH_SIZE, width // PATCH_SIZE
    x = resized.reshape(gh // merge_size, merge_size, PATCH_SIZE, gw // merge_size, merge_size, PATCH_SIZE, channels)
    # (bh, mh, ph, bw, mw, pw, C) -> (bh, bw, mh, mw, C, ph, pw): patch rows, channel-major
    rows = np.ascontiguousarray(x.transpose(0, 3, 1, 4, 6, 2, 5)).reshape(gh * gw, -1)
    return _lookup(rows, TEMPORAL_PATCH_SIZE), (1, gh, gw)


def video_to_patches(resized_frames: np.ndarray, merge_size: int = MERGE_SIZE):
    """Resized uint8 frames (T, H, W, 3) -> ``pixel_values_videos`` rows and (T/2, h, w); odd T repeats the
    last frame, as the HF video processor does."""
    if resized_frames.shape[0] % TEMPORAL_PATCH_SIZE:
        resized_frames = np.concatenate([resized_frames, resized_frames[-1:]], axis=0)
    rows, grid = patchify(resized_frames, merge_size)  # uint8 rows, columns (channel, frame, row, col)
    return _lookup(rows, 1), grid


def sample_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """Uniformly spaced frame indices, at most ``max_frames`` and an even count (when num_frames >= 2)."""
    keep = min(num_frames, max_frames)
    if keep >= TEMPORAL_PATCH_SIZE:
        keep -= keep % TEMPORAL_PATCH_SIZE
    # the HF video processor's arange(0, total, total / keep) rule
    return np.arange(0, num_frames, num_frames / keep).astype(np.int64)[:keep]


def jpeg_recompress_pil(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at ``quality`` with PIL (the augmentation when DALI is not installed)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))
