#!/usr/bin/env python
"""Merge mllm_mega checkpoints of the same architecture (Valley2.5-style weight averaging / TIES).

  python tools/merge_checkpoints.py --inputs A B [C ...] --out M                      # equal-weight average
  python tools/merge_checkpoints.py --inputs A B --weights 0.7 0.3 --out M           # normalised to sum 1
  python tools/merge_checkpoints.py --inputs A B --method ties --base B0 [--density 0.2] [--lambda 1.0] --out M

Inputs may be saved at any TP/PP (they are loaded whole, at TP=1, in this process: memory ~ (inputs + 2) x
fp32 model). The output is a model-only checkpoint (iteration 0) with the first input's meta and hf_extra.
Mismatched architectures, bad paths and a non-empty --out exit 2 with `error: ...` and write nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="checkpoint roots (or iter_XXXXXXX dirs)")
    p.add_argument("--method", default="linear", choices=["linear", "ties"])
    p.add_argument("--weights", nargs="+", type=float, default=None, help="linear: one per input (normalised)")
    p.add_argument("--base", default=None, help="ties: the checkpoint the task vectors are relative to")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each task vector kept")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="ties: scale of the merged task vector")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from mllm_mega.checkpoint.merge import merge_checkpoints

    try:
        record = merge_checkpoints(args.inputs, args.out, method=args.method, weights=args.weights,
                                   base=args.base, density=args.density, lam=args.lam)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"error: merge failed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({record['method']} merge of {len(record['inputs'])} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
