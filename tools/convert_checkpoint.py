#!/usr/bin/env python
"""Checkpoint conversion between HF Qwen2(.5)-VL directories and mllm_mega (megatron dist) checkpoints.

  python tools/convert_checkpoint.py import-hf --hf-dir H --out M
  torchrun --nproc_per_node=N tools/convert_checkpoint.py verify --hf-dir H --load M [--tp T --pp P --cp C]
      [--inputs inputs.pt]     # last line: max_abs_diff=<x> rel_diff=<y>; exit 1 when over tolerance
      [--check-grads]          # CP > 1: also every parameter gradient vs CP=1 (exit 1 over --grad-rtol)
  python tools/convert_checkpoint.py export-hf --load M --out H [--dtype bf16|fp16|fp32] [--max-shard-size 5GB]
  python tools/convert_checkpoint.py roundtrip --hf-dir H [--tp T --pp P]
      # import -> (re-save at TP/PP) -> export -> every tensor bit-identical to H? exit 1 if not
  torchrun --nproc_per_node=T*P tools/convert_checkpoint.py reshard --load M --out M2 --tp T --pp P
  python tools/convert_checkpoint.py check --load M
      # every file of every checkpoint (ROOT: each iter_*, or one iter dir) against its manifest: prints
      # `OK <dir>` or `BAD <dir>: <file>: <problem>` per checkpoint; exit 0 all intact, 1 any bad

Errors (bad paths, non-checkpoint directories, a non-empty --out, ...) exit 2 with `error: ...` on stderr and
leave nothing at --out.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fail(cmd: str, err: Exception) -> int:
    msg = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"error: {cmd} failed: {msg}", file=sys.stderr)
    return 2


def _check(load: str) -> int:
    from mllm_mega.training import checkpointing as ckpt
    from mllm_mega.training.integrity import MANIFEST
    from mllm_mega.training.resume import checkpoint_problems

    if not os.path.isdir(load):
        return _fail("check", FileNotFoundError(f"{load!r} not found"))
    dirs = [ckpt.iter_dir(load, it) for it in ckpt.complete_iterations(load)] or [load]
    if dirs == [load] and not os.path.isfile(os.path.join(load, "metadata.json")):
        return _fail("check", ValueError(f"{load!r} is neither a checkpoint root (no iter_* directory) nor a "
                                         "checkpoint (no metadata.json)"))
    tracked, tracker_problem = ckpt.read_tracker(load)
    bad = bool(tracker_problem)
    if tracker_problem:
        print(f"BAD {tracker_problem}")
    elif tracked is not None and not os.path.isdir(ckpt.iter_dir(load, tracked)):
        print(f"BAD {os.path.join(load, ckpt.TRACKER)}: names iteration {tracked}, whose directory is missing")
        bad = True
    for d in dirs:
        problems = checkpoint_problems(d)
        if problems:
            bad = True
            print(f"BAD {d}: " + "; ".join(problems))
        elif not os.path.isfile(os.path.join(d, MANIFEST)):
            print(f"UNVERIFIED {d}: no {MANIFEST} (saved by an older version)")
        else:
            print(f"OK {d}")
    return 1 if bad else 0


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
    v.add_argument("--atol", type=float, default=1e-6,
                   help="max abs logits difference allowed (fp32; tiny models measure 3-4e-7; larger models "
                        "accumulate more rounding: raise it for them)")
    v.add_argument("--kernels", default="torch", choices=["auto", "torch", "triton"])
    # context parallel: N = DP x CP x TP x PP ranks
    v.add_argument("--cp", type=int, default=1, help="context-parallel size (packed samples split over CP ranks)")
    v.add_argument("--check-grads", action="store_true", help="CP > 1: compare every gradient with CP=1's")
    v.add_argument("--grad-rtol", type=float, default=2e-6,
                   help="max abs gradient difference allowed, relative to the largest |gradient| (fp32 tiny "
                        "models measure 3.6e-7: 3e-5 on gradients up to 86)")
    e = sub.add_parser("export-hf", help="mllm_mega checkpoint (any TP/PP) -> HF directory")
    e.add_argument("--load", required=True, help="checkpoint root or one of its iter_XXXXXXX directories")
    e.add_argument("--out", required=True)
    e.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the source dtype of the import)")
    e.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2MiB")
    r = sub.add_parser("roundtrip", help="import, export and compare every tensor with the HF source")
    r.add_argument("--hf-dir", required=True)
    r.add_argument("--tp", type=int, default=1, help="re-save at this TP before exporting (torchrun child)")
    r.add_argument("--pp", type=int, default=1, help="re-save at this PP before exporting (torchrun child)")
    r.add_argument("--num-llm-layers-in-first-stage", type=int, default=None)
    r.add_argument("--max-shard-size", default="5GB")
    r.add_argument("--workdir", default=None, help="where the intermediate files go (default: system temp)")
    r.add_argument("--keep", action="store_true", help="keep the intermediate checkpoint and export")
    rs = sub.add_parser("reshard", help="collective: load at --tp/--pp and save again (a checkpoint of that layout)")
    rs.add_argument("--load", required=True)
    rs.add_argument("--out", required=True)
    rs.add_argument("--tp", type=int, default=1)
    rs.add_argument("--pp", type=int, default=1)
    rs.add_argument("--num-llm-layers-in-first-stage", type=int, default=None)
    c = sub.add_parser("check", help="verify checkpoint files against their manifests (sizes, content hashes)")
    c.add_argument("--load", required=True, help="checkpoint root (every iter_* in it) or one iter_XXXXXXX")
    args = p.parse_args(argv)
    if args.cmd == "check":
        return _check(args.load)

    from mllm_mega.checkpoint import convert, export

    errors = (FileNotFoundError, FileExistsError, KeyError, ValueError)
    if args.cmd == "export-hf":
        try:
            index = export.export_hf(args.load, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
        except errors as err:
            return _fail("export-hf", err)
        shards = len(set(index["weight_map"].values()))
        print(f"wrote {args.out}: {len(index['weight_map'])} tensors in {shards} shard(s), "
              f"{index['metadata']['total_size']} bytes")
        return 0
    if args.cmd == "roundtrip":
        try:
            rep = export.roundtrip(args.hf_dir, tp=args.tp, pp=args.pp, max_shard_size=args.max_shard_size,
                                   num_llm_layers_in_first_stage=args.num_llm_layers_in_first_stage,
                                   workdir=args.workdir, keep=args.keep)
        except (*errors, RuntimeError) as err:  # RuntimeError: the re-save child failed (its stderr is in it)
            return _fail("roundtrip", err)
        for line in rep["problems"][:20]:
            print(f"mismatch: {line}")
        if rep["workdir"]:
            print(f"kept {rep['workdir']}")
        status = "bit-identical" if not rep["problems"] else f"{len(rep['problems'])} MISMATCH(ES)"
        print(f"roundtrip tp={args.tp} pp={args.pp}: {rep['tensors']} tensors compared ({rep['dtype']}): {status}")
        return 0 if not rep["problems"] else 1
    if args.cmd == "reshard":
        import torch.distributed as dist

        try:
            export.reshard(args.load, args.out, tp=args.tp, pp=args.pp,
                           num_llm_layers_in_first_stage=args.num_llm_layers_in_first_stage)
        except errors as err:
            return _fail("reshard", err)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"wrote {args.out} (saved at TP={args.tp} PP={args.pp})")
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0

    if args.cmd == "import-hf":
        try:
            convert.import_hf(args.hf_dir, args.out)
        except errors as err:
            return _fail("import-hf", err)
        print(f"wrote {args.out}")
        return 0
    if args.cmd == "verify":
        import torch.distributed as dist

        try:
            max_abs, rel = convert.verify(args.hf_dir, args.load, tp=args.tp, pp=args.pp,
                                          inputs_path=args.inputs, atol=args.atol,
                                          num_llm_layers_in_first_stage=args.num_llm_layers_in_first_stage,
                                          kernels=args.kernels, cp=args.cp)
            grads = None
            if args.check_grads:  # context parallel: gradients at CP vs CP=1
                from mllm_mega.parallel.context_check import verify_grads

                grads = verify_grads(args.load, tp=args.tp, cp=args.cp, inputs_path=args.inputs,
                                     kernels=args.kernels)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: verify failed: {e}", file=sys.stderr)
            return 2
        rank = dist.get_rank() if dist.is_initialized() else 0
        if grads is not None and rank == 0:
            print(f"grads cp={args.cp} vs cp=1: max_abs_diff={grads[0]:.6e} max_abs_grad={grads[1]:.6e}", flush=True)
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            print(f"max_abs_diff={max_abs:.6e} rel_diff={rel:.6e}", flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0 if max_abs <= args.atol and (grads is None or grads[0] <= args.grad_rtol * grads[1]) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
