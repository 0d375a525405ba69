"""examples/slurm/*: shell syntax, and train.sbatch's launch, signal forwarding and requeue decisions run
without a cluster: `srun` and `scontrol` are fakes on PATH, and the "training" is a fake interpreter that
records its torchrun command line and leaves the run directory in a chosen state (finished, stopped early,
crashed, or waiting for a forwarded signal)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SLURM_DIR = os.path.join(ROOT, "examples", "slurm")
SCRIPT = os.path.join(SLURM_DIR, "train.sbatch")
CONFIG = "examples/configs/tiny_synthetic.yaml"

FAKE_SRUN = """
# fake srun: record the arguments, run the per-node command as node 0 of 1 in its own process group, and
# forward USR1/TERM to that whole group (as slurmstepd signals every process of the step)
import os, signal, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["FAKE_DIR"], "srun_args"), "w") as f:
    f.write("\\n".join(args) + "\\n")
env = {**os.environ, "SLURM_NNODES": "1", "SLURM_NODEID": "0",
       "PYTHON": os.path.join(os.environ["FAKE_DIR"], "fake_python")}
proc = subprocess.Popen(args[args.index("bash"):], env=env, start_new_session=True)
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: os.killpg(proc.pid, signum))
sys.exit(proc.wait())
"""

FAKE_SCONTROL = r"""#!/bin/bash
case "$1 $2" in
  "show hostnames") echo node-a; echo node-b ;;
  "requeue "*) echo "$2" >> "$FAKE_DIR/requeued" ;;
  *) echo "fake scontrol: unexpected $*" >&2; exit 1 ;;
esac
"""

# the "training": argv and signal env to files, then act as FAKE_MODE says
FAKE_PYTHON = r"""#!/bin/bash
printf '%s\n' "$@" > "$FAKE_DIR/torchrun_args"
env | grep -E '^(PET_|MASTER_|NPROC_PER_NODE|AGENT_USR1)' | sort > "$FAKE_DIR/torchrun_env"
ckpt="$RUN_DIR_EXPECTED/checkpoints"
mkdir -p "$ckpt"
case "$FAKE_MODE" in
  complete) echo 4 > "$ckpt/latest_checkpointed_iteration.txt"; exit 0 ;;
  stopped_early) echo 2 > "$ckpt/latest_checkpointed_iteration.txt"; exit 0 ;;
  crash) echo 2 > "$ckpt/latest_checkpointed_iteration.txt"; exit 1 ;;
  no_final_save)
    for i in 1 2 3 4; do echo "{\"iteration\": $i, \"loss\": 1.0}" >> "$RUN_DIR_EXPECTED/metrics.jsonl"; done
    echo 2 > "$ckpt/latest_checkpointed_iteration.txt"; exit 0 ;;
  wait_signal)
    trap 'echo "got $SIG"; echo 3 > "$ckpt/latest_checkpointed_iteration.txt"; exit 1' USR1 TERM
    touch "$FAKE_DIR/started"
    for i in $(seq 300); do sleep 0.1; done
    exit 0 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", f"#!{sys.executable}\n" + FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fake_python").write_text(FAKE_PYTHON)
    (tmp_path / "fake_python").chmod(0o755)
    return tmp_path


def _env(fake, mode, run_dir, **extra):
    return {**os.environ, "PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "FAKE_DIR": str(fake),
            "FAKE_MODE": mode, "RUN_DIR_EXPECTED": str(run_dir), "PYTHON": sys.executable,
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2",
            "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_ON_NODE": "2", "NPROC_PER_NODE": "2",
            "AGENT_USR1": "forward", **extra}


def _start(fake, mode, *overrides, **extra):
    run_dir = fake / "run"
    cmd = ["bash", SCRIPT, CONFIG, f"run_dir={run_dir}", "train.max_steps=4", *overrides]
    proc = subprocess.Popen(cmd, cwd=str(fake), env=_env(fake, mode, run_dir, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, run_dir


def _run(fake, mode, *overrides, **extra):
    proc, run_dir = _start(fake, mode, *overrides, **extra)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, run_dir


def _requeued(fake):
    path = fake / "requeued"
    return path.read_text().split() if path.exists() else []


def test_scripts_parse():
    scripts = [os.path.join(SLURM_DIR, f) for f in sorted(os.listdir(SLURM_DIR)) if f.endswith((".sh", ".sbatch"))]
    assert SCRIPT in scripts and os.path.join(SLURM_DIR, "stages.sh") in scripts
    res = subprocess.run(["bash", "-n", *scripts], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sbatch_directives():
    lines = [line.split("#")[1].strip() for line in open(SCRIPT) if line.startswith("#SBATCH")]
    for want in ("SBATCH --ntasks-per-node=1", "SBATCH --gpus-per-node=8", "SBATCH --requeue",
                 "SBATCH --open-mode=append"):
        assert want in lines, want
    assert any(line.startswith("SBATCH --signal=B:USR1@") for line in lines)
    assert any(line.startswith("SBATCH --nodes=") for line in lines)


def test_complete_run_launches_torchrun_per_node(fake):
    rc, out, run_dir = _run(fake, "complete", "train.global_batch_size=4", AGENT_USR1="auto")
    assert rc == 0, out
    assert "training finished: iteration 4 of 4" in out
    assert _requeued(fake) == []
    args = (fake / "torchrun_args").read_text().split("\n")
    for want in ("-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0", "--nproc_per_node=2",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=node-a:{20000 + 4242}", "--rdzv-id=4242",
                 "mllm_mega.train", "--config", CONFIG, "train.global_batch_size=4", f"run_dir={run_dir}"):
        assert want in args, (want, args)
    assert args.index("--config") > args.index("mllm_mega.train")
    env = (fake / "torchrun_env").read_text()
    assert "MASTER_ADDR=node-a" in env
    # this torch's torchrun can handle SIGUSR1 itself (auto -> forward), with time for the save
    assert "AGENT_USR1=forward" in env and "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in env
    assert "PET_SHUTDOWN_TIMEOUT=240" in env
    srun = (fake / "srun_args").read_text().split("\n")
    assert "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun


def test_stopped_early_requeues(fake):
    rc, out, _ = _run(fake, "stopped_early")
    assert rc == 0, out
    assert "stopped at iteration 2 of 4" in out and "requeueing job 4242" in out
    assert _requeued(fake) == ["4242"]


def test_requeue_limit(fake):
    rc, out, _ = _run(fake, "stopped_early", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    assert rc == 1, out
    assert "MAX_REQUEUES=3 reached" in out and _requeued(fake) == []


def test_crash_does_not_requeue(fake):
    rc, out, _ = _run(fake, "crash")
    assert rc == 1, out
    assert "not requeueing" in out and _requeued(fake) == []


def test_metrics_count_when_the_run_did_not_save_at_its_end(fake):
    rc, out, _ = _run(fake, "no_final_save")
    assert rc == 0, out
    assert "training finished: iteration 4 of 4" in out and _requeued(fake) == []


def test_bad_config_fails_before_launch(fake):
    rc, out, _ = _run(fake, "complete", "train.max_stepz=3")
    assert rc == 2, out
    assert "did not load" in out and "did you mean 'train.max_steps'" in out
    assert not (fake / "srun_args").exists()


@pytest.mark.parametrize("sig, requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_signal_is_forwarded_and_usr1_requeues(fake, sig, requeue):
    proc, _ = _start(fake, "wait_signal")
    try:
        deadline = time.time() + 30
        while not (fake / "started").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(sig)  # as --signal=B:USR1@N (or scancel's SIGTERM) reaches the batch shell
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = sig.name
    assert f"received {name}: forwarding it" in out, out
    assert "stopped at iteration 3 of 4" in out, out
    # torchrun (here the fake) exits non-zero after a signal; the per-node shell reports 0 to srun
    assert "torchrun ended after a signal" in out and "srun exit status 0" in out, out
    if requeue:
        assert proc.returncode == 0 and _requeued(fake) == ["4242"], out
    else:
        assert proc.returncode == 1 and _requeued(fake) == [] and "not requeueing" in out, out
