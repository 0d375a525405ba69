"""examples/train_tiny_dpo.sh (SFT, then MPO from its checkpoint on distinct pairs used once), shortened.

The full script's claim (reward accuracy on unseen pairs) takes minutes; this checks the chaining it relies on:
stage 2 starts from stage 1's weights and tokenizer, reads its own pairs for one epoch at most, and the script
prints the per-10-step accuracy curve."""
import json
import os
import sys

import yaml

from tests.conftest import ROOT


def test_train_tiny_dpo_script_shortened(tmp_path):
    import subprocess

    env = {**os.environ, "PY": sys.executable, "PYTHONWARNINGS": "ignore",
           "SFT_DIR": str(tmp_path / "sft"), "RUN_DIR": str(tmp_path / "pref"),
           "SFT_DATA": str(tmp_path / "sft_data"), "PAIRS": str(tmp_path / "pairs"),
           "SFT_ARGS": "train.max_steps=2 synthetic.num=40 data.buffer_size=16 data.seq_len=512 logging.log_interval=1"}
    cmd = ["bash", "examples/train_tiny_dpo.sh", "train.max_steps=3", "synthetic.num=40", "data.buffer_size=8",
           "data.seq_len=256", "logging.log_interval=1"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    out = res.stdout
    assert out.count("generating the synthetic dataset") == 2
    assert f"initial weights from {tmp_path / 'sft' / 'checkpoints'}" in out
    assert "reward accuracy on unseen pairs (mean per 10 steps) 2-3: " in out
    cfg = yaml.safe_load(open(tmp_path / "pref" / "config.yaml"))
    assert cfg["data"]["epochs"] == 1 and cfg["data"]["tokenizer_dir"] == str(tmp_path / "sft_data" / "tokenizer")
    assert cfg["objective"]["preset"] == "mpo" and cfg["synthetic"]["seed"] == 1
    rows = [json.loads(line) for line in open(tmp_path / "pref" / "metrics.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and all("rewards_accuracy" in r for r in rows)
    assert rows[-1]["consumed_samples"] <= 40  # no pair is read twice
