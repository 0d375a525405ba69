"""Sequence packing: First-Fit-Decreasing (FFD) and Best-Fit-Decreasing (BFD) bin packing of samples.

Several image-text samples are packed into one context of ``capacity`` tokens (Open-Qwen2VL packs into
4096-token contexts with FFD), optionally with a cap on images per pack (InternVL2.5's multimodal packing)
and on samples per pack. The fast path is the C++ extension ``mllm_mega._packer`` (csrc/packer.cpp);
``pack_ffd_reference`` / ``pack_bfd_reference`` are the plain-Python specification the tests hold it to.

Both algorithms visit the items by length descending, ties by original index ascending, so the same input
always gives the same bins. FFD puts each item into the first bin (in creation order) that satisfies every
cap; BFD into the bin with the smallest residual capacity that does, ties by the earliest bin; both open a
new bin when none does. FFD uses at most 11/9 * OPT + 6/9 bins (Dosa, 2007) without the extra caps.

Packing decides only which samples share a context; the consumer must still keep packed samples from
attending to each other (per-sample cu_seqlens, MRoPE positions restarting per sample).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

from mllm_mega import _packer

__all__ = [
    "pack_ffd",
    "pack_bfd",
    "pack_ffd_csr",
    "pack_bfd_csr",
    "csr_to_bins",
    "pack_ffd_reference",
    "pack_bfd_reference",
    "packing_stats",
]


def _as_index_array(x, name: str) -> np.ndarray:
    """numpy view of ``x`` without casting (so float input is rejected by the extension, not truncated)."""
    if isinstance(x, np.ndarray):
        return x
    arr = np.asarray(x)
    if arr.size == 0 and arr.ndim == 1:
        return arr.astype(np.int64)  # np.asarray([]) is float64; an empty list is a valid empty input
    return arr


def _check_int(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _call(fn, lengths, capacity, images, max_images, max_items, allow_unpackable):
    capacity = _check_int(capacity, "capacity")
    if capacity is None:
        raise ValueError("capacity must be an int, got None")
    return fn(
        _as_index_array(lengths, "lengths"),
        capacity,
        None if images is None else _as_index_array(images, "images"),
        _check_int(max_images, "max_images"),
        _check_int(max_items, "max_items"),
        bool(allow_unpackable),
    )


def csr_to_bins(offsets: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    """Splits CSR bins into a list of int64 arrays (views into ``indices``), one per bin."""
    return np.split(indices, offsets[1:-1]) if len(offsets) > 1 else []


def pack_ffd_csr(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-Fit-Decreasing in C++, returning raw CSR arrays (no per-bin Python objects; for big inputs).

    Args:
        lengths: (n,) int32 or int64 token count of each item; >= 0 (zero-length items are legal).
        capacity: tokens per bin, > 0.
        images: (n,) int32 or int64 images per item, >= 0; only used with ``max_images``.
        max_images: cap on the sum of ``images`` in one bin (>= 0); requires ``images``.
        max_items: cap on the number of items in one bin (>= 1).
        allow_unpackable: if True, items longer than ``capacity`` or with more than ``max_images`` images
            are left out and returned in ``unpackable``; if False they raise ``ValueError``.

    Returns:
        ``(offsets, indices, unpackable)``, int64: bin ``b`` holds ``indices[offsets[b]:offsets[b + 1]]``,
        bins in creation order and items in placement order; ``unpackable`` is ascending (empty unless
        ``allow_unpackable``).

    Raises:
        ValueError: naming the argument, for negative values, ``capacity <= 0``, a dtype other than
            int32/int64, a non-1-D array, mismatched lengths of ``lengths`` and ``images``, ``max_images``
            without ``images``, or an unpackable item when ``allow_unpackable`` is False.
    """
    return _call(_packer.ffd, lengths, capacity, images, max_images, max_items, allow_unpackable)


def pack_bfd_csr(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best-Fit-Decreasing in C++, returning raw CSR arrays; arguments as in :func:`pack_ffd_csr`."""
    return _call(_packer.bfd, lengths, capacity, images, max_images, max_items, allow_unpackable)


def _bins_result(csr, allow_unpackable: bool):
    offsets, indices, unpackable = csr
    bins = csr_to_bins(offsets, indices)
    return (bins, unpackable) if allow_unpackable else bins


def pack_ffd(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
):
    """First-Fit-Decreasing packing (C++): each item, by length descending (ties by index), goes to the first
    bin in creation order that satisfies every cap; a new bin is opened when none does.

    Arguments as in :func:`pack_ffd_csr`. Returns a list of int64 arrays, the item indices of each bin
    (bins in creation order, items in placement order), or ``(bins, unpackable)`` when
    ``allow_unpackable`` is True.
    """
    return _bins_result(
        pack_ffd_csr(lengths, capacity, images=images, max_images=max_images, max_items=max_items,
                     allow_unpackable=allow_unpackable),
        allow_unpackable,
    )


def pack_bfd(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
):
    """Best-Fit-Decreasing packing (C++): each item, by length descending (ties by index), goes to the bin with
    the smallest residual capacity that satisfies every cap (ties by earliest bin); a new bin is opened when
    none does.

    Arguments and return value as in :func:`pack_ffd`.
    """
    return _bins_result(
        pack_bfd_csr(lengths, capacity, images=images, max_images=max_images, max_items=max_items,
                     allow_unpackable=allow_unpackable),
        allow_unpackable,
    )


# ---------------------------------------------------------------------------------------------------------
# Plain-Python reference: the specification (and the slow benchmark baseline). Straightforward on purpose.
# ---------------------------------------------------------------------------------------------------------


def _reference_inputs(lengths, capacity, images, max_images, max_items, allow_unpackable):
    """Validates like the extension; returns (lengths, images, packable order, unpackable)."""
    if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity <= 0:
        raise ValueError(f"capacity must be an int > 0, got {capacity!r}")
    arrays = {"lengths": lengths, "images": images}
    values = {}
    for name, arr in arrays.items():
        if arr is None:
            continue
        arr = _as_index_array(arr, name)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array, got ndim={arr.ndim}")
        if arr.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise ValueError(f"{name} must have dtype int32 or int64, got {arr.dtype}")
        values[name] = [int(v) for v in arr]
        for i, v in enumerate(values[name]):
            if v < 0:
                raise ValueError(f"{name}[{i}] = {v} is negative")
    lens = values["lengths"]
    imgs = values.get("images")
    if imgs is not None and len(imgs) != len(lens):
        raise ValueError(f"images has {len(imgs)} entries but lengths has {len(lens)}")
    if max_images is not None:
        if imgs is None:
            raise ValueError("max_images is set but images is None")
        if max_images < 0:
            raise ValueError(f"max_images must be >= 0, got {max_images}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    if max_images is None:
        imgs = [0] * len(lens)
    unpackable = []
    for i in range(len(lens)):
        bad = None
        if lens[i] > capacity:
            bad = f"lengths[{i}] = {lens[i]} exceeds capacity = {capacity}"
        elif max_images is not None and imgs[i] > max_images:
            bad = f"images[{i}] = {imgs[i]} exceeds max_images = {max_images}"
        if bad is not None:
            if not allow_unpackable:
                raise ValueError(bad + " (pass allow_unpackable=True to get such items back instead)")
            unpackable.append(i)
    skip = set(unpackable)
    order = sorted((i for i in range(len(lens)) if i not in skip), key=lambda i: (-lens[i], i))
    return lens, imgs, order, unpackable


def _reference_pack(best_fit, lengths, capacity, images, max_images, max_items, allow_unpackable):
    lens, imgs, order, unpackable = _reference_inputs(
        lengths, capacity, images, max_images, max_items, allow_unpackable)
    image_cap = math.inf if max_images is None else max_images
    item_cap = math.inf if max_items is None else max_items
    bins: list[list[int]] = []
    used_tokens: list[int] = []
    used_images: list[int] = []
    for i in order:
        chosen = None
        for b in range(len(bins)):
            fits = (used_tokens[b] + lens[i] <= capacity and used_images[b] + imgs[i] <= image_cap
                    and len(bins[b]) < item_cap)
            if not fits:
                continue
            if not best_fit:
                chosen = b
                break
            if chosen is None or capacity - used_tokens[b] < capacity - used_tokens[chosen]:
                chosen = b
        if chosen is None:
            bins.append([])
            used_tokens.append(0)
            used_images.append(0)
            chosen = len(bins) - 1
        bins[chosen].append(i)
        used_tokens[chosen] += lens[i]
        used_images[chosen] += imgs[i]
    out = [np.array(b, dtype=np.int64) for b in bins]
    return (out, np.array(unpackable, dtype=np.int64)) if allow_unpackable else out


def pack_ffd_reference(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
):
    """Plain-Python First-Fit-Decreasing, O(n * bins): the specification of :func:`pack_ffd` (same arguments,
    same result, same ValueErrors)."""
    return _reference_pack(False, lengths, capacity, images, max_images, max_items, allow_unpackable)


def pack_bfd_reference(
    lengths,
    capacity: int,
    *,
    images=None,
    max_images: int | None = None,
    max_items: int | None = None,
    allow_unpackable: bool = False,
):
    """Plain-Python Best-Fit-Decreasing, O(n * bins): the specification of :func:`pack_bfd`."""
    return _reference_pack(True, lengths, capacity, images, max_images, max_items, allow_unpackable)


def packing_stats(lengths, bins: Sequence[np.ndarray], capacity: int, *, images=None) -> dict:
    """Summary of a packing.

    Args:
        lengths: (n,) token count of each item.
        bins: item indices of each bin, each non-empty (as returned by :func:`pack_ffd`).
        capacity: tokens per bin.
        images: optional (n,) images per item, to report images per bin.

    Returns:
        dict with ``num_bins``, ``num_items`` (packed), ``packed_tokens``, ``efficiency`` (packed tokens /
        (num_bins * capacity); 1.0 for no bins), ``lower_bound_bins`` (ceil(packed tokens / capacity)),
        ``items_per_bin_mean``, ``items_per_bin_max``, ``tokens_per_bin_max`` and, with ``images``,
        ``images_per_bin_mean`` / ``images_per_bin_max``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    num_bins = len(bins)
    counts = np.array([len(b) for b in bins], dtype=np.int64)
    if num_bins and counts.min() == 0:
        raise ValueError(f"bins[{int(np.argmin(counts))}] is empty; packing_stats expects non-empty bins")
    flat = np.concatenate(bins).astype(np.int64) if num_bins else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    def per_bin(values):  # sum of values over each bin; bins are never empty
        return np.add.reduceat(values[flat], starts) if num_bins else np.zeros(0, np.int64)

    tokens = per_bin(lengths)
    packed = int(tokens.sum())
    stats = {
        "num_bins": num_bins,
        "num_items": int(counts.sum()),
        "packed_tokens": packed,
        "efficiency": packed / (num_bins * capacity) if num_bins else 1.0,
        "lower_bound_bins": -(-packed // capacity),
        "items_per_bin_mean": float(counts.mean()) if num_bins else 0.0,
        "items_per_bin_max": int(counts.max()) if num_bins else 0,
        "tokens_per_bin_max": int(tokens.max()) if num_bins else 0,
    }
    if images is not None:
        img_per_bin = per_bin(np.asarray(images, dtype=np.int64))
        stats["images_per_bin_mean"] = float(img_per_bin.mean()) if num_bins else 0.0
        stats["images_per_bin_max"] = int(img_per_bin.max()) if num_bins else 0
    return stats
