"""Run ``tools/convert_checkpoint.py`` several times in one process: ``torchrun ... run_verify_many.py ARGS.json``.

ARGS.json is a list of argument lists for the CLI's ``main``; the interpreter start-up, the imports and the
torch.distributed world are shared (``main`` tears the world down at its end, which is skipped here, as in
tests/training/run_many.py). Prints ``=== run i`` before each run; exits with the first non-zero code.
"""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))

from convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    dist.destroy_process_group = lambda *a, **k: None
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for i, argv in enumerate(runs):
        if os.environ.get("RANK", "0") == "0":
            print(f"=== run {i}", flush=True)
        code = main(argv)
        if code:
            sys.exit(code)
