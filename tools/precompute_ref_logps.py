#!/usr/bin/env python
"""Reference log-probs for preference training (DPO / MPO), precomputed in one forward-only pass.

  torchrun --nproc_per_node=N tools/precompute_ref_logps.py --config RUN.yaml [dotted.key=value ...]
      [--load CKPT]        reference checkpoint (default: objective.reference_from, else model.init_from:
                           the policy's starting point; what training checks the file against)
      [--tp T --pp P]      layout (default: parallel.tp / parallel.pp); DP = N / (T x P) ranks share the data
      [--out FILE]         default: objective.ref_logps, else <directory of the first data shard>/ref_logps.<name>.json
      [--name NAME]        default: ref
      [--kernels K]        torch | triton | auto (default: model.kernels)

Reads ``data`` of RUN.yaml as preference pairs (data.preference is forced on, one epoch), sums each pair's
chosen and rejected completion log-probs under the reference model and writes them keyed by pair key with
what made them (mllm_mega/objectives/ref_logps.py describes the file); training with
``objective.reference=precomputed`` then holds only the policy. Prints ``wrote FILE: N pairs`` last.
Exit 2 with ``error: ...`` on bad input (missing checkpoint, a config error, a duplicated pair key); the
file is written under a temporary name and renamed, so nothing half-written is left.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's YAML config (its data and model sections)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for mllm_mega.train")
    p.add_argument("--load", default=None, help="reference checkpoint (default: model.init_from)")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default="ref")
    p.add_argument("--kernels", default=None, choices=["auto", "torch", "triton"])
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from mllm_mega.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        objective = getattr(cfg, "objective", None)  # the objective section, where the config has one
        load = args.load or getattr(objective, "reference_from", None) or cfg.model.init_from
        if not load:
            raise ValueError("no reference checkpoint: give --load or set model.init_from")
        out = args.out or getattr(objective, "ref_logps", None)
        if not os.path.isdir(load):
            raise FileNotFoundError(f"reference checkpoint {load!r} not found")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    import torch.distributed as dist

    from mllm_mega.objectives.ref_logps import precompute_to_file

    try:
        path, num_pairs, skips = precompute_to_file(
            cfg, load=load, tp=args.tp or cfg.parallel.tp, pp=args.pp or cfg.parallel.pp, out=out,
            name=args.name, kernels=args.kernels, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr, flush=True)
        return 2
    if dist.get_rank() == 0:
        if skips:
            print(f"skipped samples: {skips}", flush=True)
        print(f"wrote {path}: {num_pairs} pairs", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
