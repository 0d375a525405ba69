#!/usr/bin/env python
"""Checkpoint conversion between HF Qwen2(.5)-VL directories and mllm_mega (megatron dist) checkpoints.

  python tools/convert_checkpoint.py import-hf --hf-dir H --out M
  torchrun --nproc_per_node=N tools/convert_checkpoint.py verify --hf-dir H --load M [--tp T --pp P]
      [--inputs inputs.pt]     # last line: max_abs_diff=<x> rel_diff=<y>; exit 1 when over tolerance
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import-hf", help="HF directory -> mllm_mega dist checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    v = sub.add_parser("verify", help="compare our logits with HF transformers' on the same inputs")
    v.add_argument("--hf-dir", required=True)
    v.add_argument("--load", required=True)
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--num-llm-layers-in-first-stage", type=int, default=None)
    v.add_argument("--inputs", default=None, help="torch.save'd dict of HF processor inputs")
    v.add_argument("--atol", type=float, default=1e-4, help="max abs logits difference allowed (fp32)")
    v.add_argument("--kernels", default="torch", choices=["auto", "torch", "triton"])
    args = p.parse_args(argv)

    from mllm_mega.models.qwen2_vl import convert

    if args.cmd == "import-hf":
        try:
            convert.import_hf(args.hf_dir, args.out)
        except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: import-hf failed: {msg}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "verify":
        import torch.distributed as dist

        try:
            max_abs, rel = convert.verify(args.hf_dir, args.load, tp=args.tp, pp=args.pp,
                                          inputs_path=args.inputs, atol=args.atol,
                                          num_llm_layers_in_first_stage=args.num_llm_layers_in_first_stage,
                                          kernels=args.kernels)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: verify failed: {e}", file=sys.stderr)
            return 2
        rank = dist.get_rank() if dist.is_initialized() else 0
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            print(f"max_abs_diff={max_abs:.6e} rel_diff={rel:.6e}", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0 if max_abs <= args.atol else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
