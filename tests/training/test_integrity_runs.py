"""Checkpoint faults inside real runs: one 4-step run (checkpoints at 2 and 4) is shared by every test, each
of which copies it, breaks the copy the way a cluster does, and relaunches (one process, tiny model; the
relaunches that need no signal or mount share one launch, tests/training/run_many.py)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mllm_mega.training import checkpointing as ckpt
from mllm_mega.training import resume
from tests.conftest import ROOT
from tests.training.conftest import assert_ok, base_config, metrics, train, train_many

SMALL = {"train": {"max_steps": 4}, "checkpoint": {"save_interval": 2, "keep_last": 3},
         "data": {"seq_len": 256}}


@pytest.fixture(scope="module")
def base_run(shapes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    cfg = base_config(shapes, str(tmp), **SMALL)
    run_dir = str(tmp / "base")
    res = train(cfg, f"run_dir={run_dir}")
    assert_ok(res)
    return cfg, run_dir, res.stdout


def _copy(base_run, tmp_path, name="run"):
    cfg, run_dir, _ = base_run
    dst = str(tmp_path / name)
    shutil.copytree(run_dir, dst)
    return cfg, dst


def _shard(run_dir, it, name="__0_0.distcp"):
    return os.path.join(ckpt.iter_dir(os.path.join(run_dir, "checkpoints"), it), name)


def _flip_bytes(shard):
    with open(shard, "r+b") as f:  # 256 bytes XOR-ed inside the tensor data, as in the issue
        f.seek(os.path.getsize(shard) // 2)
        data = f.read(256)
        f.seek(-256, 1)
        f.write(bytes(b ^ 0x5A for b in data))


@pytest.fixture(scope="module")
def relaunches(base_run, tmp_path_factory):
    """The relaunches of three tests in one launch (tests/training/run_many.py), each on its own copy of the
    base run prepared here: after flipped bytes; with a changed batch size and seed (refused), then allowed;
    a layout that does not divide the world size. Returns name -> (run_dir, result)."""
    tmp = tmp_path_factory.mktemp("relaunch")
    cfg = base_run[0]
    flipped = _copy(base_run, tmp, "flipped")[1]
    _flip_bytes(_shard(flipped, 4))
    changed = _copy(base_run, tmp, "changed")[1]
    refused = {name: str(tmp / f"refused_{name}") for name in ("config.yaml", "metrics.jsonl")}
    layout = str(tmp / "layout")
    res = train_many(str(tmp), {
        "flipped": (cfg, [f"run_dir={flipped}"]),
        "refused": (cfg, [f"run_dir={changed}", "train.global_batch_size=4", "seed=7", "train.max_steps=6"],
                    [(os.path.join(changed, name), path) for name, path in refused.items()]),
        # allowed: logged with old and new values, then recorded (max_steps=4: resume and stop, no step to pay for)
        "allowed": (cfg, [f"run_dir={changed}", "train.global_batch_size=4", "train.allow_config_change=true"]),
        "layout": (cfg, [f"run_dir={layout}", "parallel.tp=2"]),  # one process: world size 1
    })
    dirs = {"flipped": flipped, "refused": changed, "allowed": changed, "layout": layout}
    return {name: (dirs[name], r) for name, r in res.items()}, refused


def test_save_overhead_of_the_manifest(base_run):
    """Hashing while saving costs well under 10% of the save (both measured by the trainer, printed)."""
    saves = re.findall(r"saved \S+ \(([\d.]+)s, manifest ([\d.]+)s\)", base_run[2])
    assert len(saves) == 2
    total, hashing = float(saves[-1][0]), float(saves[-1][1])  # the first save includes one-off warm-up
    print(f"save {total:.3f}s, of which manifest {hashing:.3f}s ({100 * hashing / total:.1f}%)")
    assert hashing < 0.10 * total


def test_flipped_bytes_fall_back_and_continue_bit_identically(base_run, relaunches):
    run_dir, res = relaunches[0]["flipped"]
    shard = _shard(run_dir, 4)
    assert_ok(res)
    assert f"{shard}: content hash" in res.stdout and "falling back to" in res.stdout
    assert "iter_0000002 (iteration 2)" in res.stdout
    assert os.path.isfile(shard.replace("iter_0000004", "iter_0000004.bad"))  # moved aside, not deleted
    ref, got = metrics(base_run[1]), metrics(run_dir)
    assert [r["iteration"] for r in got] == [1, 2, 3, 4]  # the first attempt's rows 3-4 were dropped
    for a, b in zip(ref, got):  # steps 3-4 redone from iteration 2: bit-identical to the uninterrupted run
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), (a, b)
    assert resume.checkpoint_problems(ckpt.iter_dir(os.path.join(run_dir, "checkpoints"), 4)) == []


@pytest.mark.parametrize("fault", ["missing_shard", "truncated_shard", "truncated_train_state",
                                   "missing_data_state", "missing_rng", "binary_tracker"])
def test_broken_latest_falls_back_to_the_previous(base_run, tmp_path, fault):
    """Each broken file of the latest checkpoint is named, and the resume picks iteration 2 (in-process: the
    selection the trainer runs; the relaunch itself is shown above)."""
    _, run_dir = _copy(base_run, tmp_path)
    root = os.path.join(run_dir, "checkpoints")
    extra = os.path.join(ckpt.iter_dir(root, 4), "extra")
    target = {"missing_shard": _shard(run_dir, 4, "__0_1.distcp"), "truncated_shard": _shard(run_dir, 4),
              "truncated_train_state": os.path.join(extra, "train_state.json"),
              "missing_data_state": os.path.join(extra, "data_dp0.json"),
              "missing_rng": os.path.join(extra, "rng_rank0.pt"),
              "binary_tracker": os.path.join(root, ckpt.TRACKER)}[fault]
    if fault.startswith("missing"):
        os.remove(target)
    elif fault == "binary_tracker":
        open(target, "wb").write(b"\x00\xff\x13")
    else:
        os.truncate(target, os.path.getsize(target) // 2)
    logs = []
    got = resume.select_resume_iteration(root, log=logs.append)
    if fault == "binary_tracker":  # the directories are intact: the newest one is used, the tracker named
        assert got == 4 and f"{target}: corrupt tracker" in logs[0]
        return
    assert got == 2 and target in logs[0] and "falling back to" in logs[0]
    assert os.path.isdir(ckpt.iter_dir(root, 4) + ".bad")


def test_check_tool(base_run, tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import convert_checkpoint

    _, run_dir = _copy(base_run, tmp_path)
    root = os.path.join(run_dir, "checkpoints")
    assert convert_checkpoint.main(["check", "--load", root]) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 2 and "iter_0000004" in out
    shard = _shard(run_dir, 2, "__0_1.distcp")
    with open(shard, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 8)
    assert convert_checkpoint.main(["check", "--load", ckpt.iter_dir(root, 4)]) == 0
    assert convert_checkpoint.main(["check", "--load", root]) == 1
    out = capsys.readouterr().out
    assert f"BAD {ckpt.iter_dir(root, 2)}: {shard}: content hash" in out and f"OK {ckpt.iter_dir(root, 4)}" in out
    assert convert_checkpoint.main(["check", "--load", str(tmp_path / "nowhere")]) == 2


def test_changed_batch_size_and_seed_refused(base_run, relaunches):
    (run_dir, res), refused = relaunches[0]["refused"], relaunches[1]
    saved = open(os.path.join(base_run[1], "config.yaml")).read()
    assert res.returncode == 2, res.stderr[-3000:]
    assert "train.global_batch_size: 2 -> 4" in res.stderr and "seed: 1234 -> 7" in res.stderr
    # (copied right after the refused run)
    assert open(refused["config.yaml"]).read() == saved  # the refused config is not recorded
    with open(refused["metrics.jsonl"]) as f:
        assert [json.loads(line) for line in f] == metrics(base_run[1])
    # allowed: logged with old and new values, then recorded (max_steps=4: resume and stop, no step to pay for)
    run_dir, res = relaunches[0]["allowed"]
    assert_ok(res)
    assert "allow_config_change=true: resuming with changed train.global_batch_size: 2 -> 4" in res.stdout
    assert "global_batch_size: 4" in open(os.path.join(run_dir, "config.yaml")).read()


def test_two_runs_in_one_run_dir(base_run, tmp_path):
    """The second run refuses (exit 2, naming the first) while the first runs, and runs after it ended."""
    cfg, run_dir = _copy(base_run, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen([sys.executable, "-m", "mllm_mega.train", "--config", cfg, f"run_dir={run_dir}",
                              "train.max_steps=1000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        path = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and \
                not (os.path.isfile(path) and len(open(path).readlines()) >= 5):  # resumed at 4, stepping
            time.sleep(0.5)
        second = train(cfg, f"run_dir={run_dir}", "train.max_steps=5")
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"in use by another run: host" in second.stderr and f"pid {first.pid} " in second.stderr
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    last = ckpt.latest_iteration(os.path.join(run_dir, "checkpoints"))
    res = train(cfg, f"run_dir={run_dir}", f"train.max_steps={last}")  # nothing left to do: resume, exit
    assert_ok(res)
    assert f"resumed from" in res.stdout and not os.path.exists(os.path.join(run_dir, "run.lock"))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs for the full disk needs root")
def test_disk_full_keeps_the_previous_checkpoint(base_run, tmp_path):
    cfg, src = base_run[0], base_run[1]
    run_dir = str(tmp_path / "run")
    mount = os.path.join(run_dir, "checkpoints")
    os.makedirs(mount)
    shutil.copy(os.path.join(src, "config.yaml"), run_dir)
    need = sum(os.path.getsize(os.path.join(b, n)) for b, _, names in os.walk(os.path.join(src, "checkpoints"))
               for n in names)
    one = ckpt._dir_size(ckpt.iter_dir(os.path.join(src, "checkpoints"), 4))
    size = need + one // 2  # room for what is there, not for one more checkpoint
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        shutil.copytree(os.path.join(src, "checkpoints"), mount, dirs_exist_ok=True)
        res = train(cfg, f"run_dir={run_dir}", "train.max_steps=6")
        assert res.returncode == 1, (res.stdout[-2000:], res.stderr[-3000:])
        assert f"disk full while saving {ckpt.iter_dir(mount, 6)}: the filesystem at {mount} has" in res.stderr
        assert "a checkpoint needs about" in res.stderr and "Traceback" not in res.stderr
        assert ckpt.latest_iteration(mount) == 4
        assert resume.checkpoint_problems(ckpt.iter_dir(mount, 4)) == []
        assert not [d for d in os.listdir(mount) if ".tmp" in d]
    finally:
        subprocess.run(["umount", mount], check=False)


def test_layout_not_dividing_the_world_exits_2(relaunches):
    run_dir, res = relaunches[0]["layout"]
    assert res.returncode == 2 and "error: world size 1 is not divisible by TP=2 x PP=1" in res.stderr, res.stderr
    assert not os.path.exists(run_dir)  # refused before anything was written
