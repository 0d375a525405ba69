"""Run ``python -m mllm_mega.train`` several times in one process: ``[torchrun ...] run_many.py RUNS.json``.

RUNS.json is a list of runs, each an argument list for ``mllm_mega.train.main`` or an object
``{"argv": [...], "log": PREFIX, "copy": [[SRC, DST], ...]}`` (``copy``: files rank 0 copies once the run
has ended, e.g. a metrics.jsonl that a later run in the same run_dir will change). Each run is the CLI's own code path (config parsing, megatron's groups and
seeds, trainer, metrics) — only the interpreter start-up and the imports (~15 s per launch on 2 busy cores) and
the torch.distributed world are shared: ``main`` tears the world down at its end and a second gloo rendezvous in
the same process hangs, so that one call is skipped (``initialize_distributed`` keeps an existing world and
rebuilds megatron's groups and seeds on each run).

Without ``log``, the runs write to the launch's stdout/stderr and the launch exits with the first non-zero
return code. With ``log``, a run's stdout and stderr (file descriptors 1 and 2, so megatron's and DALI's output
too) go to ``PREFIX.rank<R>.out`` / ``.err`` and its return code to ``PREFIX.rank<R>.rc``, and a non-zero return
code does not stop the later runs (tests/training/conftest.py's ``train_many`` reads them back per run, as if
each had been its own launch). An exception that escapes ``main`` stops the launch (the other ranks may be
waiting in a collective). A run with ``"tool": "tools/X.py"`` calls that tool's ``main(argv)`` instead (e.g.
tools/precompute_ref_logps.py between two training runs), in the same world.
"""
import contextlib
import importlib.util
import json
import os
import shutil
import sys

import torch.distributed as dist

from mllm_mega.train import main


@contextlib.contextmanager
def _redirected(prefix: str | None):
    if prefix is None:
        yield
        return
    rank = os.environ.get("RANK", "0")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(f"{prefix}.rank{rank}.out", "w") as out, open(f"{prefix}.rank{rank}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _tool_main(path: str):
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


if __name__ == "__main__":
    dist.destroy_process_group = lambda *a, **k: None
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    for run in runs:
        argv, prefix = (run, None) if isinstance(run, list) else (run["argv"], run.get("log"))
        entry = main if isinstance(run, list) or not run.get("tool") else _tool_main(run["tool"])
        with _redirected(prefix):
            code = entry(argv)
        if os.environ.get("RANK", "0") == "0" and isinstance(run, dict):
            for src, dst in run.get("copy", []):
                shutil.copyfile(src, dst)
        if prefix is None:
            if code:
                sys.exit(code)
        else:
            with open(f"{prefix}.rank{os.environ.get('RANK', '0')}.rc", "w") as f:
                f.write(str(code))
