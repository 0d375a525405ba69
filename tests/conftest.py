import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cmd(args, nproc=1, timeout=600, env=None):
    """Run a repository tool (optionally under torchrun with gloo ranks); returns CompletedProcess."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0"] + args
    else:
        cmd = [sys.executable] + args
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT
