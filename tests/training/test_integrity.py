"""Checkpoint integrity, fallback, retention, run lock and resume checks as functions (no training: fast).
The same features inside real training runs are tested in test_integrity_runs.py."""
import json
import os
import socket
import subprocess
import time

import pytest
import torch
import yaml

from mllm_mega.config import Config
from mllm_mega.training import checkpointing as ckpt
from mllm_mega.training import integrity, resume
from mllm_mega.training.run_lock import LOCK, RunLock, RunLocked


def _fake_checkpoint(root, it, *, nan_in_a_row=0, payload=b"x" * 1000):
    """A directory shaped like a saved checkpoint (shards, megatron metadata, extra/), with its manifest."""
    d = ckpt.iter_dir(str(root), it) + ".tmp"
    os.makedirs(os.path.join(d, "extra"))
    for name, data in {"__0_0.distcp": payload + bytes([it]), "__1_0.distcp": payload, ".metadata": b"m",
                       "metadata.json": b"{}", "extra/rng_rank1.pt": b"r",
                       "extra/train_state.json": json.dumps({"nan_in_a_row": nan_in_a_row}).encode()}.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    integrity.write_manifest(d, iteration=it)
    return d


def _saved(root, it, **kw):
    _fake_checkpoint(root, it, **kw)
    ckpt.publish(str(root), it)
    return ckpt.iter_dir(str(root), it)


# --- manifest ------------------------------------------------------------------------------------------

def test_manifest_names_each_bad_file(tmp_path):
    path = _saved(tmp_path, 2)
    assert resume.checkpoint_problems(path) == []
    # an independent reference for the hash: zlib's CRC-32 of the bytes we wrote
    import zlib
    entry = integrity.read_manifest(path)["files"]["__1_0.distcp"]
    if integrity.ALGORITHM == "crc32":
        assert entry == {"size": 1000, "hash": f"{zlib.crc32(b'x' * 1000):08x}"}

    shard = os.path.join(path, "__0_0.distcp")
    data = bytearray(open(shard, "rb").read())
    data[500] ^= 0xFF  # one flipped byte, same size
    open(shard, "wb").write(bytes(data))
    [problem] = resume.checkpoint_problems(path)
    assert shard in problem and "corrupted" in problem

    open(shard, "wb").write(bytes(data[:300]))
    [problem] = resume.checkpoint_problems(path)
    assert shard in problem and "300 bytes" in problem and "truncated" in problem

    os.remove(os.path.join(path, "extra", "rng_rank1.pt"))
    problems = resume.checkpoint_problems(path)
    assert len(problems) == 2 and any("rng_rank1.pt: missing" in p for p in problems)

    open(os.path.join(path, integrity.MANIFEST), "w").write('{"files": {')  # cut short
    [problem] = resume.checkpoint_problems(path)
    assert os.path.join(path, integrity.MANIFEST) in problem and "corrupt" in problem


def test_files_are_hashed_by_their_writer():
    assert [integrity.owner(r, 2) for r in ("__0_3.distcp", "__1_0.distcp", "extra/rng_rank1.pt",
                                            "extra/data_dp1.json", "common.pt")] == [0, 1, 1, 0, 0]
    assert integrity.owner("__3_0.distcp", 2) == 1  # loaded at a smaller world: still spread over the ranks


# --- publish order, fallback ---------------------------------------------------------------------------

def test_tracker_moves_only_after_the_directory_is_complete(tmp_path, monkeypatch):
    """A crash at the rename of iter_4.tmp -> iter_4 (simulated) leaves the tracker naming iteration 2;
    moving the tracker write before the rename would leave it naming a directory that does not exist."""
    root = str(tmp_path)
    _saved(root, 2)
    _fake_checkpoint(root, 4)
    real_replace = os.replace

    def crash_at_rename(src, dst):
        if src.endswith("iter_0000004.tmp"):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_at_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish(root, 4)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert ckpt.read_tracker(root) == (2, None)
    logs = []
    assert resume.select_resume_iteration(root, log=logs.append) == 2 and logs == []


def test_tracker_naming_a_missing_directory_falls_back_with_a_warning(tmp_path):
    root = str(tmp_path)
    _saved(root, 2)
    _saved(root, 4)
    ckpt.atomic_write_text(os.path.join(root, ckpt.TRACKER), "6")
    logs = []
    assert resume.select_resume_iteration(root, log=logs.append) == 4
    assert "iter_0000006 is missing" in logs[0] and "falling back to" in logs[0]
    assert ckpt.read_tracker(root) == (4, None)


def test_incomplete_latest_is_moved_aside_and_the_previous_one_used(tmp_path):
    root = str(tmp_path)
    _saved(root, 2)
    bad = _saved(root, 4)
    os.remove(os.path.join(bad, "__1_0.distcp"))
    logs = []
    assert resume.select_resume_iteration(root, log=logs.append) == 2
    assert "__1_0.distcp: missing" in logs[0]
    assert not os.path.exists(bad) and os.path.isfile(os.path.join(bad + ".bad", "__0_0.distcp"))  # not deleted
    assert ckpt.read_tracker(root) == (2, None) and ckpt.complete_iterations(root) == [2]


def test_no_intact_checkpoint_is_an_error_that_moves_nothing(tmp_path):
    root = str(tmp_path)
    path = _saved(root, 2)
    os.remove(os.path.join(path, integrity.MANIFEST))
    os.remove(os.path.join(path, ".metadata"))
    with pytest.raises(ValueError, match="no intact checkpoint.*iter_0000002: incomplete"):
        resume.select_resume_iteration(root)
    assert os.path.isdir(path)


def test_binary_tracker_is_named(tmp_path):
    open(os.path.join(tmp_path, ckpt.TRACKER), "wb").write(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match=ckpt.TRACKER + ": corrupt tracker"):
        ckpt.latest_iteration(str(tmp_path))


# --- retention -----------------------------------------------------------------------------------------

def test_retention_keeps_the_checkpoint_before_a_nan_run(tmp_path):
    root = str(tmp_path)
    for it, nan in ((2, 0), (4, 0), (6, 1), (8, 2)):  # 6 and 8 were saved inside a run of skipped steps
        _saved(root, it, nan_in_a_row=nan)
    ckpt._apply_retention(root, 8, keep_last=2)
    assert ckpt.complete_iterations(root) == [4, 6, 8]
    for it in (10, 12):  # training recovered: ordinary keep-last-2
        _saved(root, it)
    ckpt._apply_retention(root, 12, keep_last=2)
    assert ckpt.complete_iterations(root) == [10, 12]


def test_nonfinite_weights_or_optimizer_state_are_found():
    """What the trainer checks before a save (a NaN state is never saved as a good checkpoint)."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert integrity.nonfinite_state(model, opt) is None
    opt.state[model.bias]["exp_avg_sq"][1] = float("inf")
    assert integrity.nonfinite_state(model, opt) == "optimizer group 0 param 1 exp_avg_sq"
    opt.state[model.bias]["exp_avg_sq"][1] = 0.0
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    assert integrity.nonfinite_state(model, opt) == "model.weight"


# --- run lock ------------------------------------------------------------------------------------------

def test_second_run_refused_naming_the_holder(tmp_path):
    a, b = RunLock(str(tmp_path)), RunLock(str(tmp_path))
    a.acquire()
    with pytest.raises(RunLocked, match=f"in use by another run: host '{socket.gethostname()}' pid {os.getpid()}"):
        b.acquire()
    b.release()  # not its lock: must not remove it
    assert os.path.isfile(os.path.join(tmp_path, LOCK))
    a.release()
    assert not os.path.exists(os.path.join(tmp_path, LOCK))
    b.acquire()
    b.release()


def test_stale_locks_are_broken_with_a_warning(tmp_path):
    path = os.path.join(tmp_path, LOCK)
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = {"host": socket.gethostname(), "pid": dead.pid, "start_time": 0}
    elsewhere = {"host": "other-node", "pid": 1, "start_time": 0}
    for holder, age, why in ((here, 0, "is not running"), (elsewhere, 3600, "not refreshed for")):
        open(path, "w").write(json.dumps(holder))
        os.utime(path, (time.time() - age,) * 2)
        logs = []
        lock = RunLock(str(tmp_path), log=logs.append)
        lock.acquire()
        assert "broke the stale lock" in logs[0] and why in logs[0]
        assert json.load(open(path))["pid"] == os.getpid()
        lock.release()
    open(path, "w").write(json.dumps(elsewhere))  # another node, refreshed recently: live
    with pytest.raises(RunLocked, match="'other-node' pid 1"):
        RunLock(str(tmp_path)).acquire()


# --- resume checks -------------------------------------------------------------------------------------

def _config_dir(tmp_path, **changes):
    saved = Config().to_dict()
    with open(os.path.join(tmp_path, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)
    new = Config().to_dict()
    for key, value in changes.items():
        section, _, sub = key.rpartition(".")
        (new[section] if section else new)[sub] = value
    return new


@pytest.mark.parametrize("key,value", [("train.global_batch_size", 8), ("seed", 7), ("data.seq_len", 1024),
                                       ("data.data_path", "/other"), ("data.loss_reweighting", "square"),
                                       ("model.arch", "tiny_qwen2_vl")])
def test_breaking_config_change_refused(tmp_path, key, value):
    new = _config_dir(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=rf"{key}: .* -> {value!r}"):
        resume.check_config_change(str(tmp_path), new, allow=False)
    logs = []
    resume.check_config_change(str(tmp_path), new, allow=True, log=logs.append)
    assert key in logs[0] and repr(value) in logs[0]


def test_harmless_config_change_passes(tmp_path):
    new = _config_dir(tmp_path, **{"logging.log_interval": 7, "checkpoint.save_interval": 3,
                                   "train.max_steps": 9, "train.eval_num_captions": 0})
    logs = []
    resume.check_config_change(str(tmp_path), new, allow=False, log=logs.append)
    assert logs == []


# --- clean state ---------------------------------------------------------------------------------------

def test_metrics_truncated_to_the_resumed_iteration(tmp_path):
    path = os.path.join(tmp_path, "metrics.jsonl")
    open(path, "w").write("".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in (1, 2, 3, 4))
                          + '{"iteration": 5, "lo')  # the crash cut the last line
    assert resume.truncate_metrics(str(tmp_path), 2) == 3
    assert [json.loads(line)["iteration"] for line in open(path)] == [1, 2]


def test_partial_saves_removed_at_startup(tmp_path):
    root = os.path.join(tmp_path, "checkpoints")
    keep = _saved(root, 2)
    _fake_checkpoint(root, 4)
    open(os.path.join(tmp_path, "config.yaml.tmp-123"), "w").close()
    removed = resume.remove_partial_saves(str(tmp_path), log=lambda m: None)
    assert sorted(os.path.basename(p) for p in removed) == ["config.yaml.tmp-123", "iter_0000004.tmp"]
    assert os.path.isdir(keep) and os.listdir(tmp_path) == ["checkpoints"]


def test_corrupt_extra_files_are_named(tmp_path):
    path = os.path.join(tmp_path, "train_state.json")
    open(path, "w").write('{"iteration": 4, "sch')
    with pytest.raises(ValueError, match=f"{path} \\(train state\\) is corrupt"):
        resume.read_json(path, "train state")
    with pytest.raises(FileNotFoundError, match="data_dp0.json .* is missing"):
        resume.read_json(os.path.join(tmp_path, "data_dp0.json"), "data-loader state of DP rank 0")
    rng = os.path.join(tmp_path, "rng_rank1.pt")
    with pytest.raises(FileNotFoundError, match="rng_rank1.pt .* is missing"):
        resume.read_torch(rng, "RNG states of rank 1")
    open(rng, "wb").write(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="rng_rank1.pt .* is corrupt"):
        resume.read_torch(rng, "RNG states of rank 1")
