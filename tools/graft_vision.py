#!/usr/bin/env python
"""Graft the vision encoder of one mllm_mega checkpoint onto the LLM of another (InternVL2.5-style scaling).

  python tools/graft_vision.py --vision-from A --llm-from B --out C [--seed 0]

The ViT comes from A, the LLM from B. The patch merger comes whole from A when its output width equals B's
LLM width; otherwise its norm and first linear come from A and its output projection is re-initialised
(N(0, initializer_range^2), bias 0, seeded by --seed). C is a model-only checkpoint (iteration 0) with B's config
and A's vision config. Bad paths, different families and a non-empty --out exit 2 and write nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vision-from", required=True, help="checkpoint whose ViT (and merger) is taken")
    p.add_argument("--llm-from", required=True, help="checkpoint whose LLM is taken")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the merger output re-initialisation")
    args = p.parse_args(argv)

    from mllm_mega.checkpoint.graft import graft_vision

    try:
        summary = graft_vision(args.vision_from, args.llm_from, args.out, seed=args.seed)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        print(f"error: graft failed: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (merger: {summary['merger']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
