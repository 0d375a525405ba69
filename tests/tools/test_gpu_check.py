"""tools/gpu_check.sh: the CPU dry run runs every stage and writes results.json + summary.md; a failing or
hanging stage is recorded (and killed at its limit) while the others still run."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

STAGES = ("imports", "pytest_gpu", "bench_kernels", "bench_data", "dataset", "train_triton", "train_torch",
          "compare_training")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", os.path.join(ROOT, "tools", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpu_check"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    res = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", out], cwd=ROOT, capture_output=True,
                         text=True, timeout=900, env=env)
    return res, out


def test_dry_run_runs_every_stage(dry_run):
    res, out = dry_run
    assert res.returncode == 0, (res.stdout[-4000:], res.stderr[-3000:])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["ok"] and results["dry_run"] and results["failed"] == []
    assert tuple(results["stages"]) == STAGES
    statuses = {name: rec["status"] for name, rec in results["stages"].items()}
    assert statuses == {**dict.fromkeys(STAGES, "ok"), "pytest_gpu": "skipped"}
    s = results["stages"]
    assert s["imports"]["found"]["mllm_mega._packer"] and s["imports"]["found"]["nvidia.dali"]
    assert s["imports"]["found"]["mllm_mega._patchify"]
    assert s["bench_kernels"]["cpu_interpreter"] is True
    ops = {r["impl"] for r in s["bench_kernels"]["records"] if "skipped" not in r}
    assert {"mllm_mega varlen_attention", "mllm_mega apply_rope", "mllm_mega rms_norm",
            "mllm_mega weighted_cross_entropy"} <= ops
    # the tool's cross-check against the first (torch) implementation, fp32: measured <= 7.2e-7
    ours = [r for r in s["bench_kernels"]["records"] if r["impl"].startswith("mllm_mega") and "skipped" not in r]
    assert max(r["err_vs_first"] for r in ours) < 1e-5
    assert s["bench_data"]["images_per_s"]["dali-cpu"] > 0


def test_dry_run_training_runs_agree(dry_run):
    """Read the two runs' metrics.jsonl directly (not the script's own comparison)."""
    _, out = dry_run
    runs = {}
    for kernels in ("triton", "torch"):
        with open(os.path.join(out, f"train_{kernels}", "metrics.jsonl")) as f:
            runs[kernels] = [json.loads(line) for line in f]
    assert len(runs["triton"]) == len(runs["torch"]) == 2
    for a, b in zip(runs["triton"], runs["torch"]):
        # fp32, Triton interpreter vs torch: measured equal, or 1.2e-7 relative apart with other data
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-6), (a["loss"], b["loss"])
    assert min(runs["triton"][0]["kernel_launches"].values()) > 0
    assert max(runs["torch"][0]["kernel_launches"].values()) == 0
    with open(os.path.join(out, "summary.md")) as f:
        summary = f.read()
    for name in STAGES:
        assert f"| {name} |" in summary
    assert "| tokens/s/GPU |" in summary and "| peak memory (GB) |" in summary
    assert f"| final loss | {runs['triton'][-1]['loss']:.4f} | {runs['torch'][-1]['loss']:.4f} |" in summary


def test_failing_and_hanging_stages_are_recorded(tmp_path, monkeypatch):
    gc = _module()
    monkeypatch.setitem(gc.DRY_LIMITS, "dataset", 1)
    r = gc.Runner(str(tmp_path), dry=True)
    r.run("imports", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
    # a grandchild that would outlive the stage's process: the whole process group is killed at the limit
    pid_file = tmp_path / "pid"
    r.run("dataset", ["bash", "-c", f"sleep 30 & echo $! > {pid_file}; wait"])
    assert r.stages["imports"]["status"] == "failed" and r.stages["imports"]["rc"] == 3
    assert "boom" in r.stages["imports"]["log_tail"]
    assert r.stages["dataset"]["status"] == "timeout" and r.stages["dataset"]["seconds"] < 10
    status = f"/proc/{pid_file.read_text().strip()}/status"
    time.sleep(0.2)
    assert not os.path.exists(status) or "State:\tZ" in open(status).read()  # gone (or a zombie awaiting init)


def test_compare_flags_disagreeing_losses_and_missing_launches(tmp_path):
    gc = _module()
    ran = {k: 1 for k in ("attention_fwd", "cross_entropy_fwd")}
    none = dict.fromkeys(ran, 0)
    cases = [
        ({"losses": [6.0, 5.0], "kernel_launches": ran}, {"losses": [6.0, 5.0], "kernel_launches": none}, "ok"),
        ({"losses": [6.0, 5.1], "kernel_launches": ran}, {"losses": [6.0, 5.0], "kernel_launches": none}, "failed"),
        ({"losses": [6.0, 5.0], "kernel_launches": {**ran, "cross_entropy_fwd": 0}},
         {"losses": [6.0, 5.0], "kernel_launches": none}, "failed"),
        ({"losses": [6.0, 5.0], "kernel_launches": ran}, {"losses": [6.0, 5.0], "kernel_launches": ran}, "failed"),
    ]
    for triton, torch_run, want in cases:
        r = gc.Runner(str(tmp_path), dry=True)
        r.stages.update(train_triton=triton, train_torch=torch_run)
        gc.stage_compare(r)
        assert r.stages["compare_training"]["status"] == want, (triton, torch_run)
