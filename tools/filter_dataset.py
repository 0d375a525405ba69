#!/usr/bin/env python
"""Filter WebDataset shards by rules (text length, n-gram repetition, image size/aspect, exact and
near-duplicate images) and optionally by image-text similarity from a CLIP or SigLIP model.

    python tools/filter_dataset.py --data DIR --out DIR_FILTERED [--max-ngram-repeat 0.5] [--phash-distance 4]
        [--score-model CLIP_DIR (--min-score 0.2 | --keep-top 0.5)]

Kept samples are copied byte for byte into shards of the same names under --out, with report.json (counts by
reason, every dropped sample's key and reason). The last line of stdout is a JSON summary. See
mllm_mega/data/filtering.py for the rules. Exits 2 with `error: ...` on bad arguments or paths.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mllm_mega.data.filtering import FilterConfig, filter_dataset  # noqa: E402


def _none_or(kind):
    return lambda s: None if s.lower() in ("none", "off") else kind(s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="shard directory, glob or file")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    d = FilterConfig()
    p.add_argument("--min-words", type=_none_or(int), default=d.min_words)
    p.add_argument("--max-words", type=_none_or(int), default=d.max_words)
    p.add_argument("--ngram", type=int, default=d.ngram)
    p.add_argument("--max-ngram-repeat", type=_none_or(float), default=d.max_ngram_repeat,
                   help="drop when 1 - unique/total word n-grams exceeds this ('none' disables)")
    p.add_argument("--min-side", type=_none_or(int), default=d.min_side)
    p.add_argument("--max-aspect", type=_none_or(float), default=d.max_aspect)
    p.add_argument("--no-dedup-exact", action="store_true", help="keep exact duplicate images")
    p.add_argument("--phash-distance", type=_none_or(int), default=d.phash_distance,
                   help="near-duplicate images within this many dHash bits ('none' disables)")
    p.add_argument("--score-model", help="CLIP or SigLIP directory for the image-text score filter")
    p.add_argument("--min-score", type=float)
    p.add_argument("--keep-top", type=float, help="keep this fraction of scored samples, highest first")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)
    try:
        cfg = FilterConfig(min_words=args.min_words, max_words=args.max_words, ngram=args.ngram,
                           max_ngram_repeat=args.max_ngram_repeat, min_side=args.min_side, max_aspect=args.max_aspect,
                           dedup_exact=not args.no_dedup_exact, phash_distance=args.phash_distance,
                           score_model=args.score_model, min_score=args.min_score, keep_top=args.keep_top,
                           batch_size=args.batch_size, device=args.device)
        report = filter_dataset(args.data, args.out, cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        p.exit(2, f"error: {exc}\n")
    print(json.dumps({k: report[k] for k in ("input_samples", "kept", "dropped", "score")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
