"""The README's main job (examples/train_tiny.sh with examples/configs/tiny_synthetic.yaml), shortened."""
import os
import sys

from tests.conftest import ROOT


def test_train_tiny_script_end_to_end(tmp_path):
    import subprocess

    env = {**os.environ, "PY": sys.executable, "RUN_DIR": str(tmp_path / "run"), "PYTHONWARNINGS": "ignore"}
    cmd = ["bash", "examples/train_tiny.sh", "train.max_steps=4", f"synthetic.dir={tmp_path / 'data'}",
           "synthetic.num=200", "synthetic.num_eval=2", "train.eval_num_captions=2", "train.eval_max_new_tokens=4",
           "logging.log_interval=2", "data.buffer_size=32"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    out = res.stdout
    assert "generating the synthetic dataset" in out
    assert "layout tp=2 pp=1 cp=1 dp=1" in out
    assert out.count("[train] iter ") == 2 and "loss: " in out and "-> " in out
    assert out.count("true:") == 2 and out.count("generated:") == 2
    assert os.path.isfile(tmp_path / "run" / "captions.jsonl")
    assert os.path.isfile(tmp_path / "run" / "config.yaml")
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "hf_extra" / "preprocessor_config.json")
    assert os.listdir(tmp_path / "run" / "tensorboard")
