#!/usr/bin/env python
"""Convert a LLaVA, messages (ShareGPT) or preference-pair file into WebDataset shards for training.

    python tools/prepare_dataset.py --format llava|messages|preference --input FILE.json[l] \\
        [--image-root DIR] --out DIR [--samples-per-shard N] [--workers N]

Writes DIR/shard-NNNNNN.tar (the good rows, images copied byte for byte), DIR/report.json (bad rows by reason,
each with its row index and message) and DIR/manifest.json (what each shard holds, for resuming). Bad rows
never stop the run; rerunning with the same input keeps the shards already complete. The formats and the
sample layout are described in mllm_mega/data/convert.py. The last line of stdout is a JSON summary; check the
result with tools/check_dataset.py --data DIR --tokenizer TOK.
"""
from __future__ import annotations

import argparse
import json

from mllm_mega.data.convert import DEFAULT_SAMPLES_PER_SHARD, FORMATS, ConvertError, prepare_dataset

EXAMPLES_PER_REASON = 3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="input format")
    parser.add_argument("--input", required=True, help="a .json list of rows or a .jsonl file")
    parser.add_argument("--image-root", help="folder of relative image/video paths (default: the input's folder)")
    parser.add_argument("--out", required=True, help="output folder (created; resumed when it holds a manifest)")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                        help="input rows per shard (default %(default)s, Open-Qwen2VL's)")
    parser.add_argument("--workers", type=int, default=4, help="shards converted at once (threads)")
    args = parser.parse_args(argv)
    try:
        report = prepare_dataset(args.format, args.input, args.out, image_root=args.image_root,
                                 samples_per_shard=args.samples_per_shard, workers=args.workers, progress=True)
    except ConvertError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{report['samples']} of {report['rows']} rows converted into {report['shards']} shard(s) in {args.out} "
          f"({report['shards_written']} written, {report['shards_kept']} kept from a previous run)")
    for reason, count in report["bad_by_reason"].items():
        examples = [b for b in report["bad"] if b["reason"] == reason][:EXAMPLES_PER_REASON]
        print(f"  bad rows [{reason}]: {count}, e.g. " + "; ".join(f"row {b['row']}: {b['message']}" for b in examples))
    print(json.dumps({k: v for k, v in report.items() if k != "bad"}))


if __name__ == "__main__":
    main()
