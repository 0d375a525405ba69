"""Image decoding with NVIDIA DALI (nvJPEG on GPU, libjpeg-turbo on CPU) plus the random JPEG augmentation.

One DALI pipeline decodes a batch of encoded images (``device="mixed"`` on a GPU, ``"cpu"`` without one),
re-compresses the images that were given a quality with ``fn.jpeg_compression_distortion`` (InternVL2.5's
JPEG augmentation, quality in [75, 100]), and optionally resizes each image to its smart_resize target on the
same device. Qualities and sizes are inputs, computed by the caller from (seed, sample key), so the output of
an image does not depend on which other images share its batch (checked in tests/data/test_dali.py).

A corrupt image makes DALI fail the whole batch and leaves the pipeline unusable, so the caller validates
headers first (vision.probe_image) and, if a batch still fails, this module rebuilds the pipeline and decodes
that batch one image at a time, returning the exception for the images that fail.

A JPEG whose entropy-coded data is corrupt still decodes in libjpeg-turbo (the damaged blocks come out grey
or shifted) with only a warning on stderr ("Corrupt JPEG data: ..."), which DALI does not report. This module
watches the process's stderr while a batch decodes and, when libjpeg complained, decodes that batch one image
at a time to find the culprits, which are returned as :class:`CorruptImageError` (the loader skips them as
``image_decode_error``). Pillow silences the same warning, so the PIL path accepts such images.

DALI's cubic resize is not PIL's bicubic filter: on uint8 images it differs by at most a few levels
(measured max 4/255, mean 0.2/255). The CPU default is therefore DALI decode + PIL resize, which matches the
HF processor bit for bit; the DALI resize is the GPU path's fast option (``resize_backend="dali"``).
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Sequence

import numpy as np

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    HAVE_DALI = True
except ImportError:  # DALI is an optional dependency (extras "gpu"/"test"); vision.decode_image_pil is the fallback
    HAVE_DALI = False


# libjpeg(-turbo) warnings that mean the pixels are not what the file was meant to hold
CORRUPT_MARKERS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid JPEG file structure")
_STDERR_LOCK = threading.Lock()  # fd 2 is process-wide: one capture at a time


class CorruptImageError(RuntimeError):
    """An image that decoded only with libjpeg warnings about corrupt data."""


def _run_watching_stderr(fn):
    """``fn()`` with file descriptor 2 captured; returns (result, captured text). Text that is not a libjpeg
    corruption warning is written back to stderr, so nothing another thread printed meanwhile is lost."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    other = "".join(line for line in text.splitlines(keepends=True) if not line.startswith(CORRUPT_MARKERS))
    if other:
        sys.stderr.write(other)
        sys.stderr.flush()
    return result, text


def _complained(text: str) -> bool:
    return any(marker in text for marker in CORRUPT_MARKERS)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if HAVE_DALI:

    @pipeline_def(enable_conditionals=True)
    def _decode_pipeline(device: str, resize: bool):
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        quality = fn.external_source(name="quality", dtype=types.INT32)
        augment = fn.external_source(name="augment", dtype=types.BOOL)
        images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
        if augment:
            images = fn.jpeg_compression_distortion(images, quality=quality)
        if resize:
            size = fn.external_source(name="size", dtype=types.FLOAT)  # (height, width) per image
            # antialiased cubic: the closest DALI filter to PIL's bicubic (see the module docstring)
            images = fn.resize(images, size=size, interp_type=types.INTERP_CUBIC, antialias=True,
                               dtype=types.UINT8)
        return images


class _CorruptBatch(RuntimeError):
    """libjpeg warned about corrupt data while this batch decoded (the pipeline itself is still valid)."""

    def __init__(self, text: str):
        super().__init__(" | ".join(line for line in text.splitlines() if line.startswith(CORRUPT_MARKERS)))


class DaliDecoder:
    """Decode (and optionally augment and resize) lists of encoded images with a reusable DALI pipeline."""

    def __init__(self, device: str = "cpu", *, num_threads: int = 2, max_batch: int = 64, resize: bool = False,
                 device_id: int | None = None):
        if not HAVE_DALI:
            raise RuntimeError("nvidia-dali is not installed: pip install nvidia-dali-cuda130, or use decoder='pil'")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.device, self.num_threads, self.max_batch, self.resize = device, num_threads, max_batch, resize
        if device == "gpu" and device_id is None:
            import torch

            device_id = torch.cuda.current_device()
        self.device_id = device_id if device == "gpu" else None
        self.num_rebuilds = 0
        self._pipe = None

    def _build(self):
        # synchronous, unpipelined execution: each run() consumes exactly the batch fed just before it
        self._pipe = _decode_pipeline(
            device=self.device, resize=self.resize, batch_size=self.max_batch, num_threads=self.num_threads,
            device_id=self.device_id, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False,
        )
        self._pipe.build()

    def _run(self, encoded, qualities, sizes) -> list[np.ndarray]:
        if self._pipe is None:
            self._build()
        pipe = self._pipe
        pipe.feed_input("encoded", [np.frombuffer(e, dtype=np.uint8) for e in encoded])
        pipe.feed_input("quality", [np.array(q if q is not None else 100, dtype=np.int32) for q in qualities])
        pipe.feed_input("augment", [np.array(q is not None) for q in qualities])
        if self.resize:
            pipe.feed_input("size", [np.asarray(s, dtype=np.float32) for s in sizes])
        (out,), text = _run_watching_stderr(pipe.run)
        if _complained(text):
            raise _CorruptBatch(text)
        if self.device == "gpu":
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(encoded))]

    def decode(self, encoded: Sequence[bytes], qualities: Sequence[int | None] | None = None,
               sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray | Exception]:
        """Decoded (H, W, 3) uint8 RGB per input (resized to ``sizes`` when built with ``resize=True``),
        or the exception for an input that cannot be decoded. ``qualities[i]`` None means no augmentation."""
        n = len(encoded)
        qualities = list(qualities) if qualities is not None else [None] * n
        if sizes is None:
            if self.resize:
                raise ValueError("sizes are required when the decoder resizes")
            sizes = [(0, 0)] * n
        if len(qualities) != n or len(sizes) != n:
            raise ValueError(f"encoded ({n}), qualities ({len(qualities)}) and sizes ({len(sizes)}) differ in length")
        results: list[np.ndarray | Exception] = []
        for start in range(0, n, self.max_batch):
            chunk = slice(start, start + self.max_batch)
            try:
                results.extend(self._run(encoded[chunk], qualities[chunk], sizes[chunk]))
            except RuntimeError as batch_exc:
                # a failed run invalidates the pipeline (a corrupt-data warning does not): find the bad images
                if not isinstance(batch_exc, _CorruptBatch):
                    self._pipe = None
                    self.num_rebuilds += 1
                for e, q, s in zip(encoded[chunk], qualities[chunk], sizes[chunk]):
                    try:
                        results.extend(self._run([e], [q], [s]))
                    except _CorruptBatch as exc:
                        results.append(CorruptImageError(f"corrupt JPEG data: {exc}"))
                    except RuntimeError as exc:
                        self._pipe = None
                        self.num_rebuilds += 1
                        results.append(exc)
        return results


def resolve_backends(cfg) -> tuple[str, str, str]:
    """(decoder, decode device, resize backend) of a DataConfig, "auto" resolved; invalid pairs are errors."""
    decoder = cfg.decoder if cfg.decoder != "auto" else ("dali" if HAVE_DALI else "pil")
    if decoder == "dali" and not HAVE_DALI:
        raise ValueError("decoder='dali' but nvidia-dali is not installed")
    device = cfg.decode_device
    if device == "auto":
        device = "gpu" if decoder == "dali" and cuda_available() else "cpu"
    if device == "gpu" and decoder != "dali":
        raise ValueError("decode_device='gpu' needs decoder='dali'")
    resize = cfg.resize_backend if cfg.resize_backend != "auto" else ("dali" if device == "gpu" else "pil")
    if resize == "dali" and decoder != "dali":
        raise ValueError("resize_backend='dali' needs the DALI decoder")
    return decoder, device, resize
