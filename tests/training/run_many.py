"""Run ``python -m mllm_mega.train`` several times in one process: ``[torchrun ...] run_many.py RUNS.json``.

RUNS.json is a list of argument lists for ``mllm_mega.train.main``. Each run is the CLI's own code path
(config parsing, megatron's groups and seeds, trainer, metrics) — only the interpreter start-up and the
imports (~15 s per launch on 2 busy cores) and the torch.distributed world are shared: ``main`` tears the
world down at its end and a second gloo rendezvous in the same process hangs, so that one call is skipped
(``initialize_distributed`` keeps an existing world and rebuilds megatron's groups and seeds on each run).
Exits with the first non-zero return code.
"""
import json
import sys

import torch.distributed as dist

from mllm_mega.train import main

if __name__ == "__main__":
    dist.destroy_process_group = lambda *a, **k: None
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for argv in runs:
        code = main(argv)
        if code:
            sys.exit(code)
