#!/usr/bin/env python
"""Images/s of decode + JPEG augmentation + NaViT resize + normalize/patchify, per backend.

    python tools/bench_data.py [--num-images 256] [--size 500 375] [--threads 2] [--jpeg-prob 0.5]

Backends (the pipeline of mllm_mega/data/loader.py, without tokenization/packing):
  pil             PIL decode, PIL JPEG re-encode/decode, PIL bicubic resize, numpy normalize+patchify
  dali-cpu        DALI CPU decode + fn.jpeg_compression_distortion, PIL resize, numpy (the CPU default)
  dali-cpu-resize DALI CPU decode + distortion + DALI cubic resize, numpy
  dali-gpu        DALI mixed decode (nvJPEG) + distortion + resize on the GPU, numpy (only with CUDA)
  hf-pil          baseline: PIL decode + transformers' Qwen2VLImageProcessorPil (no JPEG augmentation)
  hf-torchvision  baseline: PIL decode + transformers' torchvision Qwen2VLImageProcessor (when torchvision loads;
                  --torchvision-path DIR loads an unzipped wheel from DIR, a benchmark-only workaround)
With --jpeg-prob 0 the summary also gives each of our backends' speed as a multiple of each baseline's
(the same decode + resize + normalize + patchify work on the same images).
Input: ImageNet-size synthetic photos (smooth gradients, texture, shapes) as quality-90 baseline JPEGs,
generated in memory. Prints one line per backend and a JSON summary as the last line.

With --compare-hf ROUNDS it instead times the same work on both sides, interleaved (compare_with_hf):
    OMP_NUM_THREADS=1 python tools/bench_data.py --threads 1 --num-images 64 --compare-hf 15 \\
        --torchvision-path /tmp/tv   # pip download torchvision --no-deps; unzip the wheel into /tmp/tv

With --loader N it also times the whole training loader (read, tokenize, pack, decode, patchify, collate)
over a synthetic shapes dataset of N samples (56-112 px images) written to a temporary directory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageDraw

from mllm_mega.data import vision as V
from mllm_mega.data.dali_decode import HAVE_DALI, DaliDecoder, cuda_available


def make_jpegs(n, width, height, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        base = np.stack([(x * (1 + i % 3)) % 256, (y * 2 + i) % 256, ((x + y) // 2 + 40 * i) % 256], -1)
        img = Image.fromarray(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
            draw.ellipse([x0, y0, x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)],
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def bench_pil(jpegs, qualities, targets, threads):
    def one(args):
        data, q, (h, w) = args
        img = V.decode_image_pil(data)
        if q is not None:
            img = V.jpeg_recompress_pil(img, q)
        return V.image_to_patches(V.resize_pil(img, h, w))[0]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, zip(jpegs, qualities, targets)))


def bench_dali(decoder, jpegs, qualities, targets, threads, resized):
    images = decoder.decode(jpegs, qualities, targets)

    def finish(args):
        img, (h, w) = args
        return V.image_to_patches(img if resized else V.resize_pil(img, h, w))[0]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(finish, zip(images, targets)))


def use_side_torchvision(path):
    """Benchmark-only workaround: import torchvision's Python transforms from ``path`` (an unzipped wheel kept out
    of the environment) with its operator meta registrations stubbed out. The PyPI torchvision is a CUDA build
    whose C ops do not load with the CPU torch; the transforms the Qwen2-VL torchvision processor uses
    (resize, normalize, reshape) are plain torch ops and work without them. Must run before transformers is
    imported (it caches whether torchvision is importable)."""
    import sys
    import types

    if not os.path.isdir(os.path.join(path, "torchvision")):
        raise SystemExit(f"error: --torchvision-path {path!r} has no torchvision/ package (unzip the wheel there)")
    if "transformers" in sys.modules:
        raise RuntimeError("--torchvision-path must take effect before transformers is imported")
    sys.path.insert(0, path)
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision  # noqa: F401

    return torchvision.__version__


def hf_processors(max_pixels):
    """The transformers baselines that load here: {name: processor}."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = {"hf-pil": Qwen2VLImageProcessorPil(max_pixels=max_pixels)}
    try:
        import torchvision  # noqa: F401 - the fast processor needs it; the PyPI build may not load with CPU torch
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        out["hf-torchvision"] = Qwen2VLImageProcessor(max_pixels=max_pixels)
    except Exception as exc:  # noqa: BLE001 - any import failure means no baseline
        print(f"hf-torchvision: not available ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return out


def bench_hf(processor, jpegs, threads):
    def one(data):
        with Image.open(io.BytesIO(data)) as img:
            return processor(images=[img.convert("RGB")], return_tensors="np")["pixel_values"]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jpegs))


def hf_decode(data):
    """What transformers' load_image does with encoded bytes: PIL open, EXIF transpose, convert to RGB."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def compare_with_hf(jpegs, targets, processors, rounds, dali_decoder=None):
    """Per-image CPU cost of the same work, ours vs transformers', on the same images, interleaved.

    Two comparisons, each with the same input on both sides and ``pixel_values`` (float32 numpy) as output:
      from decoded: an (H, W, 3) uint8 RGB array -> smart_resize + bicubic resize + rescale/normalize + patchify
      from JPEG:    the encoded bytes -> decode (PIL for transformers, as its load_image does; ours: PIL and DALI
                    CPU) -> the same
    Every round times one pass over all images for every column, the column order rotating each round, so
    background load falls on all columns alike; per-round ratios give the spread. The time is the process's CPU
    time (time.process_time: every thread, DALI's included), the cost the issue asks about, which other jobs on a
    shared machine disturb far less than wall time (they still share caches and memory bandwidth).
    """
    decoded = [V.decode_image_pil(j) for j in jpegs]
    ref = V.image_to_patches(V.resize_pil(decoded[0], *targets[0]))[0]
    for name, p in processors.items():  # the same output: equal to the PIL processor's, same shape as torchvision's
        got = p(images=[decoded[0]], return_tensors="np")["pixel_values"]
        if got.shape != ref.shape or (name == "hf-pil" and not np.array_equal(got, ref)):
            raise RuntimeError(f"{name} computes different pixel_values than ours: not the same work")

    def ours_from_array():
        for img, (h, w) in zip(decoded, targets):
            V.image_to_patches(V.resize_pil(img, h, w))

    def ours_from_jpeg_pil():
        for data, (h, w) in zip(jpegs, targets):
            V.image_to_patches(V.resize_pil(V.decode_image_pil(data), h, w))

    def ours_from_jpeg_dali():
        for img, (h, w) in zip(dali_decoder.decode(jpegs), targets):
            V.image_to_patches(V.resize_pil(img, h, w))

    def hf_from_array(p):
        return lambda: [p(images=[img], return_tensors="np") for img in decoded]

    def hf_from_jpeg(p):
        return lambda: [p(images=[hf_decode(data)], return_tensors="np") for data in jpegs]

    columns = {"decoded/ours": ours_from_array}
    columns.update({f"decoded/{name}": hf_from_array(p) for name, p in processors.items()})
    columns["jpeg/ours-pil-decode"] = ours_from_jpeg_pil
    if dali_decoder is not None:
        columns["jpeg/ours-dali-decode"] = ours_from_jpeg_dali
    columns.update({f"jpeg/{name}": hf_from_jpeg(p) for name, p in processors.items()})
    names = list(columns)
    for fn in columns.values():  # warm-up (DALI pipeline build, torch first-call overheads)
        fn()
    ms = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t = time.process_time()
            columns[name]()
            ms[name].append((time.process_time() - t) * 1e3 / len(jpegs))
    out = {"ms_per_image": {}, "speed_vs_hf": {}}
    for name, v in ms.items():
        out["ms_per_image"][name] = {"median": round(float(np.median(v)), 3), "min": round(min(v), 3),
                                     "max": round(max(v), 3)}
        print(f"{name:28s} {np.median(v):7.2f} CPU ms/image  (min {min(v):.2f}, max {max(v):.2f}, {rounds} rounds)")
    for group in ("decoded", "jpeg"):
        for ours in (n for n in names if n.startswith(f"{group}/ours")):
            for base in (n for n in names if n.startswith(f"{group}/hf-")):
                per_round = [b / o for o, b in zip(ms[ours], ms[base])]  # > 1: ours is faster
                key = f"{ours} vs {base}"
                out["speed_vs_hf"][key] = {"median": round(float(np.median(per_round)), 2),
                                           "min": round(min(per_round), 2), "max": round(max(per_round), 2)}
                print(f"speed {key}: {np.median(per_round):.2f}x (per-round {min(per_round):.2f}-{max(per_round):.2f})")
    return out


def bench_loader(num_samples, seq_len, threads):
    import tempfile

    from mllm_mega.data.config import DataConfig
    from mllm_mega.data.loader import build_train_loader
    from mllm_mega.data.synthetic import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, num_samples, seed=0, num_eval=0)
        results = {}
        for decoder in ("dali", "pil") if HAVE_DALI else ("pil",):
            cfg = DataConfig(data_path=os.path.join(tmp, "train"), tokenizer_dir=os.path.join(tmp, "tokenizer"),
                             seq_len=seq_len, epochs=1, decoder=decoder, num_workers=threads, prefetch=0)
            start = time.perf_counter()
            loader = build_train_loader(cfg, dp_rank=0, dp_size=1)
            packs = sum(1 for _ in loader)
            seconds = time.perf_counter() - start
            st = loader.stats
            results[decoder] = {"samples_per_s": round(st["samples"] / seconds, 1),
                                "packs_per_s": round(packs / seconds, 2),
                                "tokens_per_s": round(st["real_tokens"] / seconds),
                                "packing_efficiency": round(st["real_tokens"] / (packs * seq_len), 4)}
            print(f"loader/{decoder:10s} {results[decoder]}")
        return results


def timed(fn, repeats):
    fn()  # warm-up (DALI pipeline build, thread start)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64, help="DALI batch size")
    parser.add_argument("--jpeg-prob", type=float, default=0.5)
    parser.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    parser.add_argument("--backends", nargs="*", default=None)
    parser.add_argument("--loader", type=int, default=0, metavar="N",
                        help="also time the full loader over N synthetic samples")
    parser.add_argument("--seq-len", type=int, default=4096, help="pack length for --loader")
    parser.add_argument("--compare-hf", type=int, default=0, metavar="ROUNDS",
                        help="instead of the backend table: per-image cost of the same work (decoded image or JPEG "
                             "-> pixel_values, no augmentation) against transformers' processors, ROUNDS interleaved "
                             "rounds (see compare_with_hf)")
    parser.add_argument("--torchvision-path", default=None, metavar="DIR",
                        help="benchmark-only: import torchvision from DIR (an unzipped wheel, not installed) with its "
                             "meta registrations stubbed, for the hf-torchvision baseline (see use_side_torchvision)")
    args = parser.parse_args(argv)
    tv_version = use_side_torchvision(args.torchvision_path) if args.torchvision_path else None
    import torch

    torch.set_num_threads(args.threads)  # the torchvision processor's torch ops; PIL and our numpy are 1-thread

    jpegs = make_jpegs(args.num_images, *args.size)
    qualities = [V.jpeg_quality_for(0, 0, f"img{i}", 0, args.jpeg_prob, (75, 100)) for i in range(len(jpegs))]
    targets = [V.smart_resize(*V.probe_image(j), max_pixels=args.max_pixels) for j in jpegs]
    if args.compare_hf:
        dali = DaliDecoder("cpu", num_threads=args.threads, max_batch=args.batch) if HAVE_DALI else None
        summary = compare_with_hf(jpegs, targets, hf_processors(args.max_pixels), args.compare_hf, dali)
        summary.update({"num_images": len(jpegs), "size": list(args.size), "threads": args.threads,
                        "torch_threads": torch.get_num_threads(), "torchvision": tv_version,
                        "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])), "max_pixels": args.max_pixels,
                        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                        "load_average": [round(x, 2) for x in os.getloadavg()]})
        print(json.dumps(summary))
        return

    runs = {"pil": lambda: bench_pil(jpegs, qualities, targets, args.threads)}
    if HAVE_DALI:
        dec = DaliDecoder("cpu", num_threads=args.threads, max_batch=args.batch)
        dec_r = DaliDecoder("cpu", num_threads=args.threads, max_batch=args.batch, resize=True)
        runs["dali-cpu"] = lambda: bench_dali(dec, jpegs, qualities, targets, args.threads, False)
        runs["dali-cpu-resize"] = lambda: bench_dali(dec_r, jpegs, qualities, targets, args.threads, True)
        if cuda_available():
            dec_g = DaliDecoder("gpu", num_threads=args.threads, max_batch=args.batch, resize=True)
            runs["dali-gpu"] = lambda: bench_dali(dec_g, jpegs, qualities, targets, args.threads, True)
    for name, processor in hf_processors(args.max_pixels).items():
        runs[name] = lambda p=processor: bench_hf(p, jpegs, args.threads)
    if args.backends:
        runs = {k: v for k, v in runs.items() if k in args.backends}

    results = {}
    for name, fn in runs.items():
        seconds = timed(fn, args.repeats)
        results[name] = round(len(jpegs) / seconds, 1)
        print(f"{name:16s} {results[name]:9.1f} images/s  ({len(jpegs)} images in {seconds:.3f} s)")
    loader = bench_loader(args.loader, args.seq_len, args.threads) if args.loader else None
    ratios = None
    if args.jpeg_prob == 0:  # only then is it the same work as the baselines (they do no augmentation)
        ratios = {f"{ours}/{base}": round(results[ours] / results[base], 2) for base in results
                  if base.startswith("hf-") for ours in results if not ours.startswith("hf-")}
        for k, v in ratios.items():
            print(f"speed {k}: {v:.2f}x")
    summary = {"images_per_s": results, "speed_vs_hf": ratios, "loader": loader, "num_images": len(jpegs), "size": list(args.size),
               "mean_jpeg_bytes": int(np.mean([len(j) for j in jpegs])), "threads": args.threads,
               "jpeg_prob": args.jpeg_prob, "max_pixels": args.max_pixels, "cpu_count": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "cuda": cuda_available()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
