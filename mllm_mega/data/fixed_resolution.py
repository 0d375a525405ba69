"""Fixed-resolution image processing (SigLIP-style ViTs, e.g. Open-Qwen2VL's SigLIP-SO400M-patch14-384).

Every image is resized to one ``image_size`` whatever its own size, so each image costs the same
``tokens_per_image`` LLM tokens (Open-Qwen2VL: 27x27 = 729 SigLIP patches average-pooled to 12x12 = 144), the
placeholder of a sample expands to that count and packing (FFD into ``seq_len``) sees it before any decoding.
Videos are not part of this scheme: a sample with a video is skipped as ``video_not_supported``.

The reference is transformers' ``SiglipImageProcessorPil`` (the PIL "slow" backend): convert_to_rgb
(transparency composited onto white; vision.decode_image_pil does the same), a PIL resize of the uint8 image to
(H, W) with ``resample`` (SigLIP: bicubic), rescale in float64 cast to float32, then (x - mean) / std in
float32. :meth:`FixedResolution.image_to_patches` looks each byte up in a table built with exactly that
arithmetic, so its values are bit-identical (tests/data/test_fixed_resolution.py).

Layout: ``pixel_values`` rows are flattened ``patch_size`` x ``patch_size`` patches, row-major over the patch
grid, each laid out (channel, row in patch, column in patch), i.e. ``img(3, H, W)[:, :gh*p, :gw*p]
.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(-1, 3*p*p)``; a linear layer on these rows is the
ViT's stride-``p`` patch convolution. The grid is (1, H // p, W // p): like that convolution (no padding), the
last H % p rows and W % p columns are not seen (384 = 27 * 14 + 6 for SigLIP-384).

Backends (dali_decode.py): DALI decoding + this PIL resize (the CPU default) gives the same pixels as the PIL
path; DALI's own resize (``resize_backend="dali"``, what "auto" picks with GPU decoding) is an antialiased cubic
filter, not PIL's bicubic (measured up to 21 uint8 levels on small images scaled to 42x42, mean 0.19 levels):
set ``data.resize_backend: pil`` where parity with the HF processor matters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mllm_mega.data.samples import Medium
from mllm_mega.data.text import IMAGE
from mllm_mega.data.vision import BadSample, inspect_image

IMAGE_PROCESSING = ("dynamic", "fixed")  # dynamic: Qwen2-VL smart_resize (vision.py), the default
FIXED_KEYS = ("image_size", "patch_size", "tokens_per_image", "image_mean", "image_std", "resample",
              "rescale_factor")
PIL_RESAMPLE = {int(r): r.name for r in Image.Resampling}  # NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, ...


@dataclass(frozen=True)
class FixedResolution:
    """One image size for every image; see the module docstring. Field names are the loader options'."""

    image_size: tuple[int, int]  # (height, width) every image is resized to
    patch_size: int  # side of one ViT patch
    tokens_per_image: int  # LLM placeholder tokens per image (after the projector's pooling)
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int = int(Image.Resampling.BICUBIC)  # a PIL resampling filter
    rescale_factor: float = 1 / 255
    _tables: np.ndarray = field(init=False, repr=False, compare=False)  # (3, 256) float32

    def __post_init__(self):
        def fail(key, why):
            raise ValueError(f"image_processing='fixed': {key} {why}")

        size = tuple(self.image_size) if isinstance(self.image_size, (list, tuple)) else ()
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            fail("image_size", f"must be (height, width) positive ints, got {self.image_size!r}")
        if not isinstance(self.patch_size, int) or not 0 < self.patch_size <= min(size):
            fail("patch_size", f"must be a positive int no larger than image_size {size}, got {self.patch_size!r}")
        if not isinstance(self.tokens_per_image, int) or self.tokens_per_image <= 0:
            fail("tokens_per_image", f"must be a positive int, got {self.tokens_per_image!r}")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                fail(key, f"must be 3 numbers (one per RGB channel), got {value!r}")
        if not all(s > 0 for s in self.image_std):
            fail("image_std", f"must be positive, got {self.image_std!r}")
        if int(self.resample) not in PIL_RESAMPLE:
            fail("resample", f"must be a PIL resampling filter {PIL_RESAMPLE}, got {self.resample!r}")
        if not self.rescale_factor > 0:
            fail("rescale_factor", f"must be positive, got {self.rescale_factor!r}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        # every uint8 value of every channel with the processor's arithmetic (float64 rescale -> float32, then
        # float32 (x - mean) / std with float32 mean/std), so a lookup gives the processor's exact values
        scaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.array(self.image_mean, dtype=np.float32)[:, None]
        std = np.array(self.image_std, dtype=np.float32)[:, None]
        object.__setattr__(self, "_tables", np.ascontiguousarray((scaled[None, :] - mean) / std))

    @property
    def grid(self) -> tuple[int, int, int]:
        """(1, H // p, W // p): the ``image_grid_thw`` row of every image."""
        return 1, self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    def check_resize_backend(self, backend: str):
        """DALI's resize is a cubic filter only (close to PIL's bicubic, not bit-identical: dali_decode.py)."""
        if backend == "dali" and int(self.resample) != int(Image.Resampling.BICUBIC):
            raise ValueError(f"resize_backend='dali' resizes with a cubic filter only; image_processing='fixed' with "
                             f"resample={PIL_RESAMPLE[int(self.resample)]} needs resize_backend='pil'")

    def fingerprint(self) -> dict:
        """What a saved loader state must agree on (token counts, hence packs, depend on it)."""
        return {"image_processing": "fixed", "image_size": list(self.image_size), "patch_size": self.patch_size,
                "tokens_per_image": self.tokens_per_image}

    # ------------------------------------------------------------------------------------------- samples
    def image_medium(self, data: bytes, cfg):
        """The :class:`~mllm_mega.data.samples.Medium` of one encoded image (header checks, no decoding)."""
        # any aspect ratio: the 200:1 cap is smart_resize's, the processor squashes any image to image_size
        info = inspect_image(data, min_side=cfg.min_image_side, max_aspect_ratio=None)
        return Medium(IMAGE, [data], (info.height, info.width), self.image_size, self.grid,
                      alpha=info.decode_with_pil, tokens=self.tokens_per_image)

    def check_videos(self, num_videos: int):
        if num_videos:
            raise BadSample("video_not_supported", f"{num_videos} video(s) in a sample, but fixed-resolution "
                                                   "image processing takes images only")

    # ------------------------------------------------------------------------------------------- pixels
    def resize(self, image: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
        """uint8 (h, w, 3) -> (H, W, 3) with PIL and ``resample``, as the processor's PIL backend does
        (``resize_pil``'s signature; height/width default to image_size)."""
        height, width = (height, width) if height is not None else self.image_size
        if image.shape[:2] == (height, width):
            return image  # PIL's resize to the same size is a copy
        return np.asarray(Image.fromarray(image).resize((width, height), resample=int(self.resample)))

    def image_to_patches(self, resized: np.ndarray, merge_size: int | None = None):
        """Resized uint8 (H, W, 3) -> (rows (gh * gw, 3 * p * p) float32, (1, gh, gw)); see the module docstring.
        ``merge_size`` is accepted for vision.image_to_patches's signature and unused (no merge-order here)."""
        p = self.patch_size
        height, width, channels = resized.shape
        if (height, width) != self.image_size or channels != 3 or resized.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image of shape {(*self.image_size, 3)}, got {resized.dtype} "
                             f"{resized.shape}")
        _, gh, gw = self.grid
        x = resized[: gh * p, : gw * p].reshape(gh, p, gw, p, 3)
        # (gh, ph, gw, pw, C) -> (C, gh, gw, ph, pw): one contiguous uint8 plane of patch rows per channel
        planes = np.ascontiguousarray(x.transpose(4, 0, 2, 1, 3)).reshape(3, gh * gw, p * p)
        out = np.empty((gh * gw, 3, p * p), np.float32)
        values = np.empty((gh * gw, p * p), np.float32)
        for c in range(3):
            np.take(self._tables[c], planes[c], out=values, mode="clip")  # uint8 indices are always in range
            out[:, c] = values
        return out.reshape(gh * gw, -1), self.grid

    def process(self, image: np.ndarray) -> np.ndarray:
        """Decoded uint8 (h, w, 3) RGB -> ``pixel_values`` rows of one image."""
        return self.image_to_patches(self.resize(image))[0]


def image_scheme(image_processing: str = "dynamic", *, position_ids_fn=None, spatial_merge_size: int = 2,
                 **options) -> FixedResolution | None:
    """The image scheme of the loader options (FamilySpec.loader_options / eval_options): None for the default
    "dynamic" Qwen2-VL processing, a :class:`FixedResolution` for "fixed". Unknown or missing keys are errors
    that name them. With MRoPE positions (``position_ids_fn`` None) each image's token run must fill its grid."""
    if image_processing not in IMAGE_PROCESSING:
        raise ValueError(f"image_processing must be one of {IMAGE_PROCESSING}, got {image_processing!r}")
    unknown = sorted(set(options) - set(FIXED_KEYS))
    if unknown:
        raise ValueError(f"unknown loader option(s) {unknown}; image options are {list(FIXED_KEYS)}")
    if image_processing == "dynamic":
        if options:
            raise ValueError(f"loader option(s) {sorted(options)} need image_processing='fixed'")
        return None
    missing = [k for k in ("image_size", "patch_size", "tokens_per_image", "image_mean", "image_std")
               if k not in options]
    if missing:
        raise ValueError(f"image_processing='fixed' needs the loader option(s) {missing}")
    scheme = FixedResolution(**options)
    _, gh, gw = scheme.grid
    if position_ids_fn is None and (gh % spatial_merge_size or gw % spatial_merge_size or
                                    gh * gw // spatial_merge_size ** 2 != scheme.tokens_per_image):
        raise ValueError(f"image_processing='fixed' with MRoPE positions (no position_ids_fn) needs tokens_per_image "
                         f"= grid {gh}x{gw} / {spatial_merge_size}^2, got {scheme.tokens_per_image}; pass the "
                         "family's position_ids_fn (e.g. models.positions.sequential_position_ids)")
    return scheme
