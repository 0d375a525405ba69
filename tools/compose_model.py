#!/usr/bin/env python
"""Compose a new HF model of a composable family (``FamilySpec.compose_hf``; Valley2.5: the Qwen2-VL vision
tower (+ merger) of one HF directory and the Qwen3 LLM of another, the starting checkpoint of the Valley recipe).

  python tools/compose_model.py --vision-from QWEN2VL_HF_DIR --llm-from QWEN3_HF_DIR --out M [--family F]
      [--position-mode mrope|1d] [--seed 0] [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]

The merger is kept when its output width equals the Qwen3 hidden size; otherwise its output projection
(visual.merger.mlp.2) is re-initialised, N(0, initializer_range^2) with bias 0, seeded by --seed. M loads with
AutoModelForImageTextToText.from_pretrained(M, trust_remote_code=True) (rules and file list:
mllm_mega/models/families/valley/compose.py). Bad inputs exit 2 with `error: ...` and write nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from mllm_mega.models import registry

    families = registry.composable_names()
    p.add_argument("--family", default=families[0] if len(families) == 1 else None, choices=families,
                   help=f"the family to compose (registered composable families: {families})")
    p.add_argument("--vision-from", required=True, help="Qwen2-VL HF directory (Qwen2VLForConditionalGeneration)")
    p.add_argument("--llm-from", required=True, help="Qwen3 HF directory (Qwen3ForCausalLM) with tokenizer.json")
    p.add_argument("--out", required=True)
    p.add_argument("--position-mode", default="mrope", choices=["mrope", "1d"])
    p.add_argument("--seed", type=int, default=0, help="seed of the merger output re-initialisation")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: that of the Qwen3 weights)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)

    if args.family is None:
        p.error(f"--family is required (one of {families})")
    compose = registry.get(args.family).compose_hf
    try:
        summary = compose(args.vision_from, args.llm_from, args.out, position_mode=args.position_mode,
                          seed=args.seed, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: compose failed: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({summary['num_tensors']} tensors, {summary['dtype']}, merger: {summary['merger']}, "
          f"positions: {summary['position_mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
