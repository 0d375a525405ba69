#!/usr/bin/env python
"""Write the synthetic shapes dataset (WebDataset shards), a held-out caption split and its tokenizer.

    python tools/make_synthetic_dataset.py --out data/shapes --num 20000 --seed 0

Layout of --out: train/shard-NNNNNN.tar, eval/shard-NNNNNN.tar (captions only), tokenizer/ (a Hugging Face
tokenizer directory with Qwen2-VL's special tokens and a chat template), meta.json, data.yaml (a DataConfig
pointing at the above). The same --seed gives byte-identical shards. See mllm_mega/data/synthetic.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from mllm_mega.data import synthetic
from mllm_mega.data.shards import write_shard


def _write_split(out_dir, split, num, samples_per_shard, make, texts, desc):
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=num, desc=desc, unit="sample", disable=not sys.stderr.isatty())
    shards = []
    for shard_idx, start in enumerate(range(0, num, samples_per_shard)):
        def gen(start=start):
            for i in range(start, min(start + samples_per_shard, num)):
                key, fields = make(i)
                texts.extend(synthetic.sample_texts(fields))
                bar.update(1)
                yield key, fields

        path = os.path.join(out_dir, f"shard-{shard_idx:06d}.tar")
        write_shard(path, gen())
        shards.append(os.path.basename(path))
    bar.close()
    return shards


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
    parser.add_argument("--video-frac", type=float, default=0.0, help="fraction of video (frame sequence) samples")
    parser.add_argument("--caption-frac", type=float, default=0.5,
                        help="fraction of single-image samples that are captions (the rest are QA conversations)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.num < 1 or args.num_eval < 0 or args.samples_per_shard < 1:
        parser.error("--num and --samples-per-shard must be >= 1, --num-eval >= 0")
    low, high = args.image_size
    if not 1 <= low <= high:
        parser.error(f"--image-size needs 1 <= MIN <= MAX, got {low} {high}")

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    common = dict(size_range=(low, high))
    texts: list[str] = []
    train = _write_split(
        os.path.join(out, "train"), "train", args.num, args.samples_per_shard,
        lambda i: synthetic.make_sample(i, args.seed, multi_image_frac=args.multi_image_frac,
                                        video_frac=args.video_frac, caption_frac=args.caption_frac, **common),
        texts, "train shards")
    held_out: list[str] = []
    evals = _write_split(
        os.path.join(out, "eval"), "eval", args.num_eval, args.samples_per_shard,
        lambda i: synthetic.make_sample(i, args.seed, split="eval", **common), held_out, "eval shards")
    # the tokenizer learns from the training text only (held-out captions use the same small vocabulary)
    special = synthetic.train_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size=args.vocab_size)

    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer")))
    meta = {"num_train": args.num, "num_eval": args.num_eval, "seed": args.seed, "image_size": [low, high],
            "train_shards": train, "eval_shards": evals, "vocab_size": vocab, "special_tokens": special}
    _write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=2) + "\n")
    _write_atomic(os.path.join(out, "data.yaml"),
                  f"data_path: {os.path.join(out, 'train')}\n"
                  f"eval_data_path: {os.path.join(out, 'eval')}\n"
                  f"tokenizer_dir: {os.path.join(out, 'tokenizer')}\n")
    print(json.dumps({"out": out, "train_samples": args.num, "eval_samples": args.num_eval,
                      "train_shards": len(train), "vocab_size": vocab}))


def _write_atomic(path: str, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
