"""Benchmark of the C++ FFD/BFD packer (mllm_mega._packer) against the plain-Python reference.

For 10k, 100k and 1M items drawn from a caption-like and an interleaved-like length distribution, packed into
``--capacity`` tokens (4096 by default), prints: C++ FFD and BFD time (best of ``--repeats``, raw CSR output,
single-threaded), Python reference FFD time (only up to ``--ref-max-items`` items; it is O(n * bins)), the
speedup, whether the bins are identical to the reference, packing efficiency and bins vs the lower bound
ceil(sum / capacity).

    python tools/bench_packing.py            # table
    python tools/bench_packing.py --json     # one JSON object per row
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mllm_mega.data.packing import (
    csr_to_bins,
    pack_bfd_csr,
    pack_ffd_csr,
    pack_ffd_reference,
    packing_stats,
)


def caption_like(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One image of 64..1024 tokens plus 20..200 text tokens per sample."""
    lengths = rng.integers(64, 1025, n) + rng.integers(20, 201, n)
    return lengths.astype(np.int64), np.ones(n, dtype=np.int64)


def interleaved_like(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of 500..4000 tokens with 1..6 images each."""
    return rng.integers(500, 4001, n).astype(np.int64), rng.integers(1, 7, n).astype(np.int64)


DISTRIBUTIONS = {"caption": caption_like, "interleaved": interleaved_like}


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_case(dist: str, n: int, args, max_images: int | None) -> dict:
    rng = np.random.default_rng(args.seed)
    lengths, images = DISTRIBUTIONS[dist](rng, n)
    caps = {"images": images, "max_images": max_images} if max_images is not None else {}
    t_ffd, (offsets, indices, _) = best_time(lambda: pack_ffd_csr(lengths, args.capacity, **caps), args.repeats)
    t_bfd, (b_offsets, b_indices, _) = best_time(lambda: pack_bfd_csr(lengths, args.capacity, **caps),
                                                 args.repeats)
    bins = csr_to_bins(offsets, indices)
    stats = packing_stats(lengths, bins, args.capacity, images=images)
    bfd_stats = packing_stats(lengths, csr_to_bins(b_offsets, b_indices), args.capacity)
    row = {
        "distribution": dist if max_images is None else f"{dist}, max_images={max_images}",
        "num_items": n,
        "capacity": args.capacity,
        "ffd_s": t_ffd,
        "bfd_s": t_bfd,
        "ref_s": None,
        "speedup": None,
        "identical_to_ref": None,
        "ffd_bins": stats["num_bins"],
        "bfd_bins": bfd_stats["num_bins"],
        "lower_bound_bins": stats["lower_bound_bins"],
        "ffd_efficiency": stats["efficiency"],
        "items_per_bin": stats["items_per_bin_mean"],
        "images_per_bin_max": stats["images_per_bin_max"],
    }
    if n <= args.ref_max_items:
        t0 = time.perf_counter()
        ref_bins = pack_ffd_reference(lengths, args.capacity, **caps)
        row["ref_s"] = time.perf_counter() - t0
        row["speedup"] = row["ref_s"] / t_ffd
        row["identical_to_ref"] = len(ref_bins) == len(bins) and all(
            np.array_equal(a, b) for a, b in zip(ref_bins, bins))
    return row


def fmt_row(r: dict) -> str:
    ref = "skipped (too slow)" if r["ref_s"] is None else f"{r['ref_s']:.2f} s"
    speedup = "-" if r["speedup"] is None else f"{r['speedup']:.0f}x"
    same = "-" if r["identical_to_ref"] is None else ("yes" if r["identical_to_ref"] else "NO")
    return (f"| {r['distribution']} | {r['num_items']:,} | {r['ffd_s'] * 1e3:.1f} | {r['bfd_s'] * 1e3:.1f} | {ref} | "
            f"{speedup} | {same} | {100 * r['ffd_efficiency']:.2f}% | {r['ffd_bins']:,} / {r['bfd_bins']:,} / "
            f"{r['lower_bound_bins']:,} | {r['items_per_bin']:.2f} | {r['images_per_bin_max']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--max-images", type=int, default=8,
                        help="image cap for the extra interleaved row (<= 0 disables that row)")
    parser.add_argument("--ref-max-items", type=int, default=10_000,
                        help="run the Python reference only up to this many items (it is O(n * bins))")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    args = parser.parse_args(argv)

    cases = [("caption", None), ("interleaved", None)]
    if args.max_images > 0:
        cases.append(("interleaved", args.max_images))
    if not args.json:
        print("| distribution | items | C++ FFD ms | C++ BFD ms | Python ref FFD | speedup | same bins | "
              "FFD efficiency | bins FFD / BFD / lower bound | items/bin | max images/bin |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for dist, max_images in cases:
        for n in args.sizes:
            row = run_case(dist, n, args, max_images)
            ok &= row["identical_to_ref"] is not False
            print(json.dumps(row) if args.json else fmt_row(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
