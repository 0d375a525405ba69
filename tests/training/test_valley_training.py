"""Valley2.5 family in training: ``tools/compose_model.py`` output (tiny Qwen2-VL + tiny Qwen3 sources) imported
and trained a few steps at TP2 + SP, and the tiny config examples/configs/tiny_valley.yaml run by the main
training job (``python -m mllm_mega.train --config``) on the shapes data with 1-D positions — both in one launch
(run_many.py)."""
import importlib.util
import json
import math
import os

from tests.conftest import ROOT, run_cmd
from tests.training.conftest import assert_ok, metrics


def _compose_tool():
    spec = importlib.util.spec_from_file_location("compose_model_tool", os.path.join(ROOT, "tools", "compose_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_composed_model_and_tiny_valley_config_train(shapes, tmp_path):
    import torch

    from mllm_mega.checkpoint.convert import import_hf
    from mllm_mega.models.families.valley.tiny import write_tiny_sources

    torch.set_num_threads(1)
    src = write_tiny_sources(str(tmp_path / "src"), seed=2)
    composed, ckpt = str(tmp_path / "composed"), str(tmp_path / "ckpt")
    assert _compose_tool().main(["--family", "valley", "--vision-from", src["qwen2_vl"], "--llm-from", src["qwen3"], "--out", composed]) == 0
    import_hf(composed, ckpt, progress=False)

    common = ["train.max_steps=3", "train.eval_num_captions=0", "checkpoint.save_interval=100",
              "logging.tensorboard=false", "data.seq_len=256", "data.buffer_size=16", "data.num_workers=1",
              "data.prefetch=0", f"data.data_path={shapes}/train", "model.kernels=torch"]
    runs = [
        # the composed checkpoint, its own tokenizer (the Qwen3 source's, with the vision tokens)
        ["--config", os.path.join(ROOT, "examples/configs/tiny_valley.yaml"), *common,
         f"run_dir={tmp_path / 'run_composed'}", f"model.init_from={ckpt}", f"data.tokenizer_dir={composed}",
         "optimizer.warmup_steps=1"],
        # the tiny config as the main job runs it, on the shapes tokenizer, with 1-D LLM positions
        ["--config", os.path.join(ROOT, "examples/configs/tiny_valley.yaml"), *common,
         f"run_dir={tmp_path / 'run_tiny'}", f"data.tokenizer_dir={shapes}/tokenizer",
         "model.tiny_overrides={position_mode: 1d}"],
    ]
    runs_file = tmp_path / "runs.json"
    runs_file.write_text(json.dumps(runs))
    assert_ok(run_cmd([os.path.join(ROOT, "tests/training/run_many.py"), str(runs_file)], nproc=2))
    for name in ("run_composed", "run_tiny"):
        rows = metrics(str(tmp_path / name))
        assert len(rows) == 3, (name, rows)
        assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows), (name, rows)
        resolved = open(tmp_path / name / "config.yaml").read()
        assert "valley" in resolved
    assert "position_mode: 1d" in open(tmp_path / "run_tiny" / "config.yaml").read()
    # the composed run kept its architecture: the checkpoint root's meta names the Valley class
    meta = json.load(open(tmp_path / "run_composed" / "checkpoints" / "mllm_mega.json"))
    assert meta["hf_config"]["architectures"] == ["ValleyForConditionalGeneration"]

    # its export: the trained weights (not the composed ones of the tokenizer dir, which is that HF dir), the
    # remote code, and it loads with trust_remote_code
    from transformers import AutoModelForImageTextToText

    from mllm_mega.checkpoint.export import compare_hf_dirs, export_hf

    extra = os.listdir(tmp_path / "run_composed" / "checkpoints" / "hf_extra")
    assert "tokenizer.json" in extra and not any(n.endswith(".safetensors") for n in extra), extra
    out = str(tmp_path / "export")
    export_hf(str(tmp_path / "run_composed" / "checkpoints"), out, progress=False)
    n, problems = compare_hf_dirs(composed, out)
    assert n > 0 and any("values differ" in p for p in problems), problems  # 3 full-stage steps moved them
    assert not any("only in" in p or "shape" in p for p in problems), problems
    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
