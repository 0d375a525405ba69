"""examples/slurm/train.sbatch on a real SLURM cluster, on CPU: a run to completion, and a run that gets the
time-limit warning (SIGUSR1 to the batch shell), saves, requeues itself, resumes and finishes with exactly the
losses of the uninterrupted run.

Skipped unless `sbatch` is on PATH and `sinfo` answers. It submits 1-node jobs of 2 CPU processes
(NPROC_PER_NODE=2, --gpus-per-node=0) with the tiny config. On a cluster whose compute nodes do not share this
machine's /tmp, set MLLM_MEGA_SLURM_TMP to a shared directory; extra sbatch options (e.g. a partition) go in
MLLM_MEGA_SLURM_SBATCH_ARGS; MLLM_MEGA_SLURM_TEST=0 skips it.

Test aid: SLURM makes a requeued job wait ~2 minutes before it is eligible again; once the job is pending and
its old allocation is gone, the test sets its start time to now (scontrol update StartTime=now).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def _cluster_answers() -> bool:
    if os.environ.get("MLLM_MEGA_SLURM_TEST") == "0" or not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _cluster_answers(), reason="no SLURM cluster (sbatch/sinfo) available")]

SCRIPT = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
CONFIG = "examples/configs/tiny_synthetic.yaml"
STEPS = 8
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = os.environ.get("MLLM_MEGA_SLURM_TMP")
    if base:
        os.makedirs(base, exist_ok=True)
        import tempfile

        return tempfile.mkdtemp(prefix="slurm-test-", dir=base)
    return str(tmp_path_factory.mktemp("slurm"))


@pytest.fixture(scope="module")
def shapes(workdir):
    from mllm_mega.data.synthetic import make_dataset

    out = os.path.join(workdir, "shapes")
    make_dataset(out, 200, 0, num_eval=4, samples_per_shard=100, progress=False)
    return out


def _submit(workdir, shapes, name, *overrides):
    run_dir = os.path.join(workdir, name)
    log = os.path.join(workdir, f"{name}.out")
    env = {**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "REPO_DIR": ROOT,
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = ["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=10", f"--job-name=mllm_test_{name}",
           f"--output={log}", f"--chdir={ROOT}", *shlex.split(os.environ.get("MLLM_MEGA_SLURM_SBATCH_ARGS", "")),
           SCRIPT, CONFIG, f"run_dir={run_dir}", f"train.max_steps={STEPS}", "synthetic.dir=null",
           f"data.data_path={shapes}/train", f"data.tokenizer_dir={shapes}/tokenizer", "data.eval_data_path=null",
           "train.eval_num_captions=0", "logging.tensorboard=false", *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0], run_dir, log


def _job(jid) -> dict:
    """scontrol's fields of the job ({} once SLURM has forgotten it)."""
    res = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return {}
    return dict(f.split("=", 1) for f in res.stdout.split() if "=" in f)


def _read(path):
    return open(path).read() if os.path.isfile(path) else ""


def _wait(jid, log, timeout, until=None, what="the job to finish"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(jid)
        if until is not None and until(job):
            return job
        if until is None and (not job or job.get("JobState") in TERMINAL):
            return job
        time.sleep(0.5)
    subprocess.run(["scancel", jid], timeout=30)
    pytest.fail(f"timed out waiting for {what} (job {jid}: {_job(jid)})\n{_read(log)[-4000:]}")


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _tracker(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest_checkpointed_iteration.txt")) as f:
        return int(f.read())


@pytest.fixture(scope="module")
def reference(workdir, shapes):
    """An uninterrupted run of STEPS iterations (checkpoints every 4)."""
    jid, run_dir, log = _submit(workdir, shapes, "reference", "checkpoint.save_interval=4")
    job = _wait(jid, log, 240)
    return jid, job, run_dir, log


def test_train_to_completion(reference):
    jid, job, run_dir, log = reference
    text = _read(log)
    assert job.get("JobState", "COMPLETED") == "COMPLETED", text[-4000:]
    assert f"training finished: iteration {STEPS} of {STEPS}" in text, text[-4000:]
    assert f"[train] finished {STEPS} iterations" in text
    assert "requeueing" not in text
    assert [r["iteration"] for r in _metrics(run_dir)] == list(range(1, STEPS + 1))
    assert _tracker(run_dir) == STEPS
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"iter_{STEPS:07d}", "extra"))
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))


def test_usr1_saves_requeues_and_resumes(workdir, shapes, reference):
    jid, run_dir, log = _submit(workdir, shapes, "requeue", "checkpoint.save_interval=100")
    try:
        # the time-limit warning, as --signal=B:USR1@N sends it: to the batch shell only
        deadline = time.time() + 180
        while time.time() < deadline and not (os.path.isfile(os.path.join(run_dir, "metrics.jsonl"))
                                              and len(_metrics(run_dir)) >= 2):
            assert _job(jid).get("JobState") not in TERMINAL, _read(log)[-4000:]
            time.sleep(0.25)
        assert len(_metrics(run_dir)) >= 2, _read(log)[-4000:]
        subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=30)

        # saved, requeued (pending on SLURM's requeue delay); once the old allocation is gone, skip the delay
        job = _wait(jid, log, 120, until=lambda j: j.get("JobState") == "PENDING" and j.get("Reason") == "BeginTime"
                    and "requeueing job" in _read(log), what="the requeue")
        host = job.get("BatchHost")
        while host and host != "(null)":
            node = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True, text=True)
            if "COMPLETING" not in node.stdout:
                break
            time.sleep(0.5)
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True, timeout=30)
        job = _wait(jid, log, 240)
    finally:
        if _job(jid).get("JobState") not in TERMINAL + (None,):
            subprocess.run(["scancel", jid], timeout=30)

    text = _read(log)
    assert job.get("JobState", "COMPLETED") == "COMPLETED", text[-4000:]
    saved_at = int(text.split("[train] received signal 10: saving at iteration ")[1].split()[0])
    assert 2 <= saved_at < STEPS
    for line in ("received SIGUSR1: forwarding it",
                 f"stopped at iteration {saved_at} of {STEPS} (SIGUSR1, srun exit status 0)", "requeueing job", "attempt 2", f"resumed from {run_dir}/checkpoints/iter_{saved_at:07d}",
                 f"training finished: iteration {STEPS} of {STEPS}"):
        assert line in text, (line, text[-4000:])
    if job:
        assert job.get("Restarts") == "1"
    records = _metrics(run_dir)
    assert [r["iteration"] for r in records] == list(range(1, STEPS + 1))  # no iteration lost or repeated
    assert _tracker(run_dir) == STEPS
    # the resumed run continues exactly where the uninterrupted one was
    ref = _metrics(reference[2])
    assert [r["loss"] for r in records] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in ref]
    assert records[-1]["consumed_samples"] == ref[-1]["consumed_samples"]
