#!/usr/bin/env python
"""Write the synthetic shapes dataset (WebDataset shards), a held-out caption split and its tokenizer.

    python tools/make_synthetic_dataset.py --out data/shapes --num 20000 --seed 0
    python tools/make_synthetic_dataset.py --out data/shapes_pref --num 2000 --preference   # DPO/MPO pairs

Layout of --out: train/shard-NNNNNN.tar, eval/shard-NNNNNN.tar (captions only), tokenizer/ (a Hugging Face
tokenizer directory with Qwen2-VL's special tokens and a chat template), meta.json, data.yaml (DataConfig
keys pointing at the above, for --config of the other tools). The same --seed gives byte-identical shards.
--preference: the training samples are preference pairs (true caption vs one attribute changed), data.yaml
sets ``preference: true``; the held-out split stays captions. --pair-attributes colour limits which attribute
a rejected caption changes (default: any of colour, count, kind, region).
See mllm_mega/data/synthetic.py for what the images and texts show.
"""
from __future__ import annotations

import argparse
import json

from mllm_mega.data.synthetic import ATTRIBUTES, check_pair_attributes, make_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, required=True, help="number of training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-eval", type=int, default=64, help="held-out caption samples")
    parser.add_argument("--image-size", type=int, nargs=2, default=(56, 112), metavar=("MIN", "MAX"),
                        help="range of image sides in pixels")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--multi-image-frac", type=float, default=0.1, help="fraction of two-image samples")
    parser.add_argument("--video-frac", type=float, default=0.0, help="fraction of video (frame sequence) samples; with --preference, of video pairs "
                             "(rejected: another direction of motion)")
    parser.add_argument("--caption-frac", type=float, default=0.5,
                        help="fraction of single-image samples that are captions (the rest are QA conversations)")
    parser.add_argument("--preference", action="store_true",
                        help="write preference pairs (chosen: the true caption, rejected: one attribute changed)")
    parser.add_argument("--pair-attributes", default=",".join(ATTRIBUTES),
                        help="with --preference: comma-separated attributes a rejected caption may change "
                             f"(default {','.join(ATTRIBUTES)})")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (an upper bound)")
    args = parser.parse_args(argv)
    if args.num < 1 or args.num_eval < 0 or args.samples_per_shard < 1:
        parser.error("--num and --samples-per-shard must be >= 1, --num-eval >= 0")
    low, high = args.image_size
    if not 1 <= low <= high:
        parser.error(f"--image-size needs 1 <= MIN <= MAX, got {low} {high}")
    for name in ("multi_image_frac", "video_frac", "caption_frac"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    try:
        pair_attributes = check_pair_attributes(a.strip() for a in args.pair_attributes.split(",") if a.strip())
    except ValueError as e:
        parser.error(f"--pair-attributes: {e}")
    meta = make_dataset(args.out, args.num, args.seed, num_eval=args.num_eval, size_range=(low, high),
                        samples_per_shard=args.samples_per_shard, multi_image_frac=args.multi_image_frac,
                        video_frac=args.video_frac, caption_frac=args.caption_frac, vocab_size=args.vocab_size,
                        progress=True, preference=args.preference,
                        pair_attributes=pair_attributes)
    print(json.dumps({"out": args.out, "train_samples": meta["num_train"], "eval_samples": meta["num_eval"],
                      "train_shards": len(meta["train_shards"]), "vocab_size": meta["vocab_size"],
                      "preference": meta["preference"]}))


if __name__ == "__main__":
    main()
