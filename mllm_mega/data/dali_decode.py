"""Image decoding with NVIDIA DALI (nvJPEG on GPU, libjpeg-turbo on CPU) plus the random JPEG augmentation.

One DALI pipeline decodes a batch of encoded images (``device="mixed"`` on a GPU, ``"cpu"`` without one),
re-compresses the images that were given a quality with ``fn.jpeg_compression_distortion`` (InternVL2.5's
JPEG augmentation, quality in [75, 100]), and optionally resizes each image to its smart_resize target on the
same device. Qualities and sizes are inputs, computed by the caller from (seed, sample key), so the output of
an image does not depend on which other images share its batch (checked in tests/data/test_dali.py).

A corrupt image makes DALI fail the whole batch and leaves the pipeline unusable, so the caller validates
headers first (vision.probe_image) and, if a batch still fails, this module rebuilds the pipeline and decodes
that batch one image at a time, returning the exception for the images that fail.

DALI's cubic resize is not PIL's bicubic filter: on uint8 images it differs by at most a few levels
(measured max 4/255, mean 0.2/255). The CPU default is therefore DALI decode + PIL resize, which matches the
HF processor bit for bit; the DALI resize is the GPU path's fast option (``resize_backend="dali"``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    HAVE_DALI = True
except ImportError:  # DALI is an optional dependency (extras "gpu"/"test"); vision.decode_image_pil is the fallback
    HAVE_DALI = False


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
        (out,) = pipe.run()
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
            except RuntimeError:
                # the failed run invalidated the pipeline; find the bad images one by one
                self._pipe = None
                self.num_rebuilds += 1
                for e, q, s in zip(encoded[chunk], qualities[chunk], sizes[chunk]):
                    try:
                        results.extend(self._run([e], [q], [s]))
                    except RuntimeError as exc:
                        self._pipe = None
                        self.num_rebuilds += 1
                        results.append(exc)
        return results
