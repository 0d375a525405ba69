"""The preference objective through the trainer (one launch, tests/training/run_many.py): exact resume with the
BCO delta restored, and a precomputed reference made by the real tool equal to the resident one, on image and
video pairs (synthetic, video_frac 0.25).

Runs, in order: ``full`` (MPO, 3 steps, resident reference = the random initial weights, saved as
iteration 0), ``part`` + ``resume`` (the same run stopped after 2 steps by train.exit_interval and relaunched),
``precompute`` (tools/precompute_ref_logps.py on full's iteration 0) and ``pre`` (2 steps from iteration 0
with that file as the reference).
"""
import json
import os

import pytest
import yaml

from tests.training.conftest import assert_ok, metrics, train_many

PREFERENCE_KEYS = ("loss", "grad_norm", "bco_delta", "rewards_chosen", "rewards_rejected", "rewards_accuracy",
                   "loss_preference", "loss_quality", "loss_generation")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mllm_mega.data.synthetic import make_dataset

    tmp = str(tmp_path_factory.mktemp("preference"))
    data = os.path.join(tmp, "pairs")
    make_dataset(data, 24, 0, num_eval=0, samples_per_shard=12, preference=True, video_frac=0.25)  # + video pairs
    cfg = {"model": {"arch": "tiny_qwen2_5_vl", "kernels": "torch"},
           "objective": {"name": "preference", "preset": "mpo", "beta": 0.5},
           "train": {"max_steps": 3, "global_batch_size": 2, "micro_batch_size": 1, "eval_num_captions": 0},
           "optimizer": {"lr": 3.0e-3, "warmup_steps": 0},  # step 1 already moves the policy
           "checkpoint": {"save_interval": 100},
           "logging": {"tensorboard": False},
           "data": {"data_path": f"{data}/train", "tokenizer_dir": f"{data}/tokenizer", "preference": True,
                    "seq_len": 384, "buffer_size": 16, "jpeg_prob": 0.0, "prefetch": 1, "num_workers": 1,
                    "video_min_pixels": 56 * 56, "video_max_pixels": 112 * 112}}  # a few dozen tokens a video
    path = os.path.join(tmp, "dpo.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    d = {k: os.path.join(tmp, k) for k in ("full", "part", "pre")}
    init = os.path.join(d["full"], "checkpoints", "iter_0000000")
    ref = os.path.join(tmp, "ref_logps.json")
    res = train_many(tmp, {
        "full": (path, [f"run_dir={d['full']}", "checkpoint.save_initial=true", "checkpoint.save_on_exit=false"]),
        "part": (path, [f"run_dir={d['part']}", "train.exit_interval=2"]),
        "resume": (path, [f"run_dir={d['part']}", "checkpoint.save_on_exit=false"]),
        "precompute": (path, ["--load", init, "--out", ref, "--no-progress"]),
        "pre": (path, [f"run_dir={d['pre']}", f"model.init_from={init}", "objective.reference=precomputed",
                       f"objective.ref_logps={ref}", "train.max_steps=2", "checkpoint.save_on_exit=false",
                       "logging.tensorboard=true"]),
    }, tools={"precompute": "tools/precompute_ref_logps.py"})
    from mllm_mega.data.shards import iter_shard, list_shards

    video_keys = [raw.key for shard in list_shards(f"{data}/train") for raw, _ in iter_shard(shard)
                  if any(k.startswith("video.") for k in raw.fields)]
    return {"dirs": d, "res": res, "ref": ref, "video_keys": video_keys}


def test_resume_is_exact_with_the_bco_delta_restored(runs):
    for name in ("full", "part", "resume"):
        assert_ok(runs["res"][name])
    assert "reward acc" in runs["res"]["full"].stdout  # the console line carries the preference metrics
    full, part = metrics(runs["dirs"]["full"]), metrics(runs["dirs"]["part"])
    assert [r["iteration"] for r in part] == [1, 2, 3]
    for a, b in zip(full, part):
        for key in PREFERENCE_KEYS:
            assert a[key] == b[key], (a["iteration"], key, a[key], b[key])  # bit-identical
    # step 1: policy == reference (rewards 0); the delta a step uses is the mean of the previous steps'
    # batch-mean rewards, restored from the checkpoint for step 3
    means = [(r["rewards_chosen"] + r["rewards_rejected"]) / 2 for r in full]
    assert full[0]["bco_delta"] == 0.0 == means[0] and means[1] != 0.0
    assert full[2]["bco_delta"] == pytest.approx(sum(means[:2]) / 2, rel=1e-12) and full[2]["bco_delta"] != 0.0
    with open(os.path.join(runs["dirs"]["part"], "checkpoints", "iter_0000002", "extra", "train_state.json")) as f:
        state = json.load(f)["objective"]
    assert state["delta_count"] == 2 and state["delta_sum"] == pytest.approx(sum(means[:2]), rel=1e-12)


def test_precomputed_reference_from_the_tool_equals_the_resident_one(runs):
    assert_ok(runs["res"]["precompute"])
    assert "wrote " in runs["res"]["precompute"].stdout
    res = runs["res"]["pre"]
    assert_ok(res)
    assert "resident reference" not in res.stdout
    full, pre = metrics(runs["dirs"]["full"]), metrics(runs["dirs"]["pre"])
    assert len(pre) == 2
    with open(runs["ref"]) as f:
        keys = set(json.load(f)["logps"])
    assert len(keys) == 24 and set(runs["video_keys"]) <= keys and runs["video_keys"]  # video pairs too
    assert full[1]["rewards_margin"] != 0.0  # step 2: the policy has moved away from the reference
    for a, b in zip(full, pre):
        # the tool packs the pairs its own way, yet each segment's sum comes out the same (measured: identical)
        for key in PREFERENCE_KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["iteration"], key, a[key], b[key])


def test_preference_metrics_reach_tensorboard(runs):
    """Every preference metric of metrics.jsonl is a TensorBoard scalar train/<key> with the same value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(runs["dirs"]["pre"], "tensorboard"))
    events.Reload()
    rows = metrics(runs["dirs"]["pre"])
    for key in PREFERENCE_KEYS + ("rewards_margin",):
        scalars = events.Scalars(f"train/{key}")
        assert [e.step for e in scalars] == [1, 2]
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-7), key
