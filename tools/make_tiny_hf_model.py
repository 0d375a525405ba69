#!/usr/bin/env python
"""Write a tiny randomly initialised HF model directory of any registered family (no download).

  python tools/make_tiny_hf_model.py --family qwen2_5_vl --out DIR [--seed S] [--tie] [--max-shard-size 100KB]
      [--llm-hidden-size 96] [--kv-heads 4 --vision-heads 4 (TP=4-able)] [--dtype bfloat16]
"""
import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from mllm_mega.models import registry

    p.add_argument("--family", default="qwen2_5_vl", choices=registry.names())
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--max-shard-size", default=None, help="e.g. 100KB to write a sharded checkpoint")
    p.add_argument("--llm-hidden-size", type=int, default=None, help="LLM width (default 64)")
    p.add_argument("--kv-heads", type=int, default=None, help="LLM key/value heads (default 2)")
    p.add_argument("--vision-heads", type=int, default=None, help="ViT heads (default 2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"error: --out {args.out!r} exists and is not empty", file=sys.stderr)
        return 2
    import torch

    text = {k: v for k, v in (("hidden_size", args.llm_hidden_size), ("num_key_value_heads", args.kv_heads))
            if v is not None}
    vision = {"num_heads": args.vision_heads} if args.vision_heads else None
    spec = registry.get(args.family)
    if vision and not spec.has_vision:
        print(f"error: --vision-heads: family {args.family} has no vision tower", file=sys.stderr)
        return 2
    model = spec.build_tiny_hf_model(seed=args.seed, tie_word_embeddings=args.tie,
                                     **({"vision_overrides": vision} if vision else {}), **text)
    model = model.to(getattr(torch, args.dtype))
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        kwargs = {"max_shard_size": args.max_shard_size} if args.max_shard_size else {}
        model.save_pretrained(tmp, **kwargs)
        if os.path.isdir(args.out):
            os.rmdir(args.out)
        os.replace(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
