#!/usr/bin/env python
"""Compose a new HF model of a composable family (``FamilySpec.compose_hf``) from a vision-tower donor and an
LLM donor: the starting checkpoint of a recipe.

  python tools/compose_model.py --family F --vision-from VISION_HF_DIR --llm-from LLM_HF_DIR --out M
      [--position-mode mrope|1d] [--seed 0] [--dtype float32|bfloat16|float16] [--max-shard-size 5GB]

* valley: the Qwen2-VL vision tower (+ merger) of a Qwen2-VL directory and the Qwen3 LLM of another. The merger
  is kept when its output width equals the Qwen3 hidden size; otherwise its output projection
  (visual.merger.mlp.2) is re-initialised, N(0, initializer_range^2) with bias 0, seeded by --seed. M loads with
  AutoModelForImageTextToText.from_pretrained(M, trust_remote_code=True) (mllm_mega/models/families/valley/
  compose.py). --position-mode defaults to mrope.
* open_qwen2vl: a SigLIP directory (SiglipVisionModel or SiglipModel; last block dropped: second-to-last block
  features, no head) and a Qwen2 / Qwen2.5 directory -> LlavaForConditionalGeneration with a new projector seeded
  by --seed and an <image> token (mllm_mega/models/families/open_qwen2vl/compose.py). 1-D positions only.

--family may be left out when one family is composable. Bad inputs exit 2 with `error: ...` and write nothing.
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
    p.add_argument("--vision-from", required=True, help="the vision-tower donor HF directory")
    p.add_argument("--llm-from", required=True, help="the LLM donor HF directory, with its tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--position-mode", default=None, choices=["mrope", "1d"],
                   help="LLM positions, for families that offer both (default: the family's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the newly initialised projector weights")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: that of the LLM weights)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)

    if args.family is None:
        p.error(f"--family is required (one of {families})")
    compose = registry.get(args.family).compose_hf
    options = {"seed": args.seed, "dtype": args.dtype, "max_shard_size": args.max_shard_size}
    if args.position_mode is not None:
        options["position_mode"] = args.position_mode
    try:
        summary = compose(args.vision_from, args.llm_from, args.out, **options)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: compose failed: {msg}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({summary['num_tensors']} tensors, {summary['dtype']}, merger: {summary['merger']}, "
          f"positions: {summary['position_mode']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
