#!/usr/bin/env python
"""Pack a WebDataset shard set offline: token counts without decoding, FFD packing, packed shards + index.

    python tools/pack_dataset.py --data IN --out OUT --seq-len 4096 [--max-images-per-pack K]
        [--preference] [--model HF_DIR]

Each sample's token count comes from its text (tokenized with the chat template) and its images' header
sizes (-> NaViT smart_resize -> t*h*w/4 tokens), as in training; no image is decoded. All samples are
packed at once with the C++ First-Fit-Decreasing packer. --preference (or ``preference: true`` in --config):
the samples are preference pairs, each one packing unit of its chosen and rejected segments with its media
once, as training packs them. --model HF_DIR: count image tokens as that model's family does (e.g. an
Open-Qwen2VL directory: fixed resolution, k*k tokens per image; default: Qwen2-VL's dynamic resolution).
Output in OUT:
  packed-NNNNNN.tar  the samples, pack after pack; sample j of pack i is stored under the key
                     ``p{i:08d}_{j:03d}`` with its original fields plus ``key`` (the original key)
  index.json         per pack its shard and member samples (original keys, tokens, images); unpackable keys
  stats.json         packing efficiency, samples/images per pack, unpackable and skipped counts
Shards are written under a temporary name and renamed when complete; index.json and stats.json are written
last, and the old ones are removed first, so an interrupted run never leaves a directory that looks complete.
Samples longer than --seq-len or with more than K images are reported as unpackable, not dropped silently.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from mllm_mega.data.config import tool_config
from mllm_mega.data.packing import pack_ffd
from mllm_mega.data.fixed_resolution import image_scheme
from mllm_mega.data.preference import sample_functions
from mllm_mega.data.shards import ShardEvent, iter_shard, list_shards, read_sample_at, write_shard
from mllm_mega.data.text import TextProcessor
from mllm_mega.data.vision import BadSample
from mllm_mega.models.registry import loader_options_of

NO_LIMIT = 2**31 - 1  # parse without the length/image caps: over-cap samples are reported as unpackable


def measure(cfg, progress: bool, image_options: dict | None = None):
    """Restore keys, original keys, token counts and image counts of every valid sample (or pair); skip
    counts. ``image_options``: a family's loader options (the image scheme), default Qwen2-VL's."""
    parse_cfg = cfg.__class__.from_dict({**cfg.to_dict(), "seq_len": NO_LIMIT, "max_images_per_pack": None,
                                         "truncate": False})
    text = TextProcessor(cfg.tokenizer_dir)
    parse, _ = sample_functions(cfg)
    options = {k: v for k, v in (image_options or {}).items() if k != "tokens_per_second"}
    scheme = image_scheme(**options)
    restore, keys, lengths, images, skipped = [], [], [], [], {}
    bar = tqdm(desc="measuring", unit="sample", disable=not (progress and sys.stderr.isatty()))
    for shard in list_shards(cfg.data_path):
        events: list[ShardEvent] = []
        for raw, _ in iter_shard(shard, events=events):
            bar.update(1)
            try:
                spec = parse(raw, text, parse_cfg, image_scheme=scheme)
            except BadSample as exc:
                skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                continue
            restore.append(spec.restore_key)
            keys.append(raw.key)
            lengths.append(spec.length)
            images.append(spec.num_media)
        for event in events:
            print(f"warning: {event.message}", file=sys.stderr)
            skipped[event.reason] = skipped.get(event.reason, 0) + 1
    bar.close()
    return restore, keys, np.array(lengths, dtype=np.int64), np.array(images, dtype=np.int64), skipped


def write_packs(out, bins, restore, keys, packs_per_shard, progress):
    pack_shard = []
    shards = []
    bar = tqdm(total=len(bins), desc="writing", unit="pack", disable=not (progress and sys.stderr.isatty()))
    for first in range(0, len(bins), packs_per_shard):
        name = f"packed-{len(shards):06d}.tar"

        def samples(first=first):
            for i in range(first, min(first + packs_per_shard, len(bins))):
                for j, s in enumerate(bins[i]):
                    fields = dict(read_sample_at(restore[s]).fields)
                    fields["key"] = keys[s].encode()
                    yield f"p{i:08d}_{j:03d}", fields
                bar.update(1)

        write_shard(os.path.join(out, name), samples())
        shards.append(name)
        pack_shard += [len(shards) - 1] * (min(first + packs_per_shard, len(bins)) - first)
    bar.close()
    return shards, pack_shard


def write_json_atomic(path, obj):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="input shard directory, glob or file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-len", type=int, default=4096, help="pack capacity in tokens")
    parser.add_argument("--max-images-per-pack", type=int, default=None, help="cap of images+videos per pack")
    parser.add_argument("--max-samples-per-pack", type=int, default=None, help="cap of samples per pack")
    parser.add_argument("--packs-per-shard", type=int, default=1000)
    parser.add_argument("--config", help="YAML of DataConfig keys (pixels limits, tokenizer_dir, ...)")
    parser.add_argument("--tokenizer", help="tokenizer directory")
    parser.add_argument("--preference", action="store_true", default=None,
                        help="the samples are preference pairs (prompt, chosen, rejected): one packing unit each")
    parser.add_argument("--model", help="HF model directory: count image tokens as its family does")
    args = parser.parse_args(argv)
    if args.packs_per_shard < 1:
        parser.error("--packs-per-shard must be >= 1")
    try:
        cfg = tool_config(args.data, args.config, args.tokenizer, seq_len=args.seq_len,
                          max_images_per_pack=args.max_images_per_pack, max_samples_per_pack=args.max_samples_per_pack,
                          preference=args.preference)
        image_options = loader_options_of(args.model) if args.model else None
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for name in ("index.json", "stats.json"):  # the directory must not look complete until we finish
        if os.path.exists(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    t0 = time.perf_counter()
    restore, keys, lengths, images, skipped = measure(cfg, progress=True, image_options=image_options)
    t1 = time.perf_counter()
    bins, unpackable = pack_ffd(lengths, cfg.seq_len, images=images if cfg.max_images_per_pack else None,
                                max_images=cfg.max_images_per_pack, max_items=cfg.max_samples_per_pack,
                                allow_unpackable=True)
    t2 = time.perf_counter()
    shards, pack_shard = write_packs(out, bins, restore, keys, args.packs_per_shard, progress=True)
    t3 = time.perf_counter()

    fills = [int(lengths[b].sum()) for b in bins]
    per_pack_samples = [len(b) for b in bins]
    per_pack_images = [int(images[b].sum()) for b in bins]
    packed_tokens = sum(fills)
    stats = {
        "samples": int(sum(per_pack_samples)),
        "packs": len(bins),
        "packing_efficiency": round(packed_tokens / (len(bins) * cfg.seq_len), 6) if bins else 0.0,
        "lower_bound_packs": math.ceil(packed_tokens / cfg.seq_len),
        "tokens": packed_tokens,
        "unpackable": len(unpackable),
        "skipped": dict(sorted(skipped.items())),
        "samples_per_pack": {"mean": round(float(np.mean(per_pack_samples)), 3) if bins else 0.0,
                             "max": max(per_pack_samples, default=0)},
        "images_per_pack": {"mean": round(float(np.mean(per_pack_images)), 3) if bins else 0.0,
                            "max": max(per_pack_images, default=0)},
        "seq_len": cfg.seq_len,
        "max_images_per_pack": cfg.max_images_per_pack,
        "preference": cfg.preference,
        "image_processing": "fixed" if (image_options or {}).get("image_processing") == "fixed" else "dynamic",
        "seconds": {"measure": round(t1 - t0, 3), "pack": round(t2 - t1, 4), "write": round(t3 - t2, 3)},
        "shards": len(shards),
    }
    index = {
        "seq_len": cfg.seq_len,
        "shards": shards,
        "packs": [{"shard": shards[pack_shard[i]], "samples": [[keys[s], int(lengths[s]), int(images[s])] for s in b]}
                  for i, b in enumerate(bins)],
        "unpackable": [[keys[s], int(lengths[s]), int(images[s])] for s in unpackable],
    }
    write_json_atomic(os.path.join(out, "index.json"), index)
    write_json_atomic(os.path.join(out, "stats.json"), stats)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
