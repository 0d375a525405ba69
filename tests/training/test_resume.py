"""Exact resume, signals and a save killed half-way (the reliability anchors of Megatron's CI)."""
import json
import os
import signal
import subprocess
import sys
import time

from mllm_mega.training import checkpointing as ckpt
from mllm_mega.training.checkpointing import latest_iteration
from tests.conftest import ROOT
from tests.training.conftest import assert_ok, base_config, metrics, train, train_many


def test_exact_resume_dp2(shapes, tmp_path):
    """6 steps straight == 3 steps + restart + 3 steps: identical losses and grad norms (fp32, DP=2 with the
    distributed optimizer, JPEG augmentation and packing on, per-module LR groups)."""
    cfg = base_config(shapes, str(tmp_path))
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    # the three runs share one launch (tests/training/run_many.py); the first half of the split run saves
    # asynchronously (a background process; the tracker moves when it is done), the second synchronously: both
    # kinds of checkpoint are written and the resume continues bit-identically
    half1 = {name: str(tmp_path / f"half1_{name}") for name in ("metrics.jsonl", ckpt.TRACKER)}
    res = train_many(str(tmp_path), {
        "straight": (cfg, [f"run_dir={straight}"]),
        "half1": (cfg, [f"run_dir={split}", "train.exit_interval=3", "checkpoint.async_save=true"],
                  [(os.path.join(split, "metrics.jsonl"), half1["metrics.jsonl"]),
                   (os.path.join(split, "checkpoints", ckpt.TRACKER), half1[ckpt.TRACKER])]),
        "half2": (cfg, [f"run_dir={split}", "checkpoint.async_save=false"])}, nproc=2)
    assert_ok(res["straight"])
    assert_ok(res["half1"])
    assert "scheduled async save of" in res["half1"].stdout
    # what the first half left (copied when it ended)
    assert len(metrics_file(half1["metrics.jsonl"])) == 3 and open(half1[ckpt.TRACKER]).read().strip() == "3"
    assert_ok(res["half2"])
    assert "resumed from" in res["half2"].stdout and "scheduled async save of" not in res["half2"].stdout
    assert "iter_0000003 (iteration 3," in res["half2"].stdout
    assert len(metrics(straight)) == 6
    a, b = metrics(straight), metrics(split)
    assert [m["iteration"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] and x["lr"] == y["lr"], (x, y)
    assert latest_iteration(os.path.join(split, "checkpoints")) == 6
    assert a[-1]["loss"] < a[0]["loss"]


def metrics_file(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_sigterm_saves_and_exits_0(shapes, tmp_path):
    cfg = base_config(shapes, str(tmp_path))
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "mllm_mega.train", "--config", cfg,
           f"run_dir={run_dir}", "train.max_steps=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.isfile(path) and len(open(path).readlines()) >= 2):
        time.sleep(0.5)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2
    for pid in workers:  # as SLURM does: every task gets the signal
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out[-2000:], err[-4000:])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    it = latest_iteration(ckpt_dir)
    done = metrics(run_dir)
    assert it == done[-1]["iteration"] and 2 <= it < 1000
    with open(os.path.join(ckpt_dir, f"iter_{it:07d}", "extra", "train_state.json")) as f:
        assert json.load(f)["iteration"] == it
    assert "received signal" in out


def test_killed_during_save_resumes_from_previous(shapes, tmp_path):
    cfg = base_config(shapes, str(tmp_path), checkpoint={"save_interval": 2, "keep_last": 1})
    run_dir = str(tmp_path / "run")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    res = train(cfg, f"run_dir={run_dir}", env={"MLLM_MEGA_FAULT": "crash_in_save:4"})
    assert res.returncode == 17, res.stderr[-3000:]
    assert latest_iteration(ckpt_dir) == 2  # the killed save of iteration 4 never became valid
    assert os.path.isdir(os.path.join(ckpt_dir, "iter_0000004.tmp"))
    assert not os.path.exists(os.path.join(ckpt_dir, "iter_0000004"))
    first = metrics(run_dir)
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    res = train(cfg, f"run_dir={run_dir}")
    assert_ok(res)
    assert "resumed from" in res.stdout and "iter_0000002" in res.stdout
    assert f"removed partial files of an interrupted run: {ckpt_dir}/iter_0000004.tmp" in res.stdout
    assert latest_iteration(ckpt_dir) == 6
    # keep_last=1 kept only the newest complete checkpoint; the stale partial save is gone
    assert sorted(d for d in os.listdir(ckpt_dir) if d.startswith("iter_")) == ["iter_0000006"]
    m = metrics(run_dir)
    # the resume truncated metrics.jsonl to iteration 2: rows 3-4 of the first attempt are replaced, not repeated
    assert [r["iteration"] for r in m] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in m[:4]] == [r["loss"] for r in first]  # the redone steps are the same steps
