"""roundtrip: import -> (re-save at TP/PP) -> export gives back every tensor of the HF source bit for bit, in the
source dtype. TP=2 and PP=2 saves are covered by test_export (the export of the re-saved checkpoints is compared
with the source the same way)."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm_mega.checkpoint.export import compare_hf_dirs
from tests.conftest import run_cmd
from tests.tools.conftest import load_tool


def _num_tensors(hf_dir):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        return len(json.load(open(index))["weight_map"])
    return len(load_file(os.path.join(hf_dir, "model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("name,layout,dtype", [
    ("qwen2_5_vl", [], "float32"),                 # unsharded source, untied
    ("qwen2_vl", [], "float32"),                   # sharded source (index), tied embeddings
    ("wide_bf16", ["--tp", "4"], "bfloat16"),      # saved at TP=4 (4 gloo ranks), bf16 source
])
def test_roundtrip_is_bit_identical(hf_dirs, tmp_path, name, layout, dtype):
    res = run_cmd(["tools/convert_checkpoint.py", "roundtrip", "--hf-dir", hf_dirs[name], *layout,
                   "--max-shard-size", "400KB", "--workdir", str(tmp_path)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    last = res.stdout.strip().splitlines()[-1]
    print(last)
    assert last.endswith(f"{_num_tensors(hf_dirs[name])} tensors compared ({dtype}): bit-identical"), last
    assert os.listdir(tmp_path) == []  # intermediate files removed


def test_compare_detects_differences(hf_dirs, tmp_path):
    """Negative control: a changed value, a changed dtype and a missing tensor are all reported."""
    src = hf_dirs["qwen2_5_vl"]
    dst = tmp_path / "changed"
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].clone()
    t["model.norm.weight"][3] = torch.nextafter(t["model.norm.weight"][3], torch.tensor(10.0))
    t["visual.merger.mlp.0.bias"] = t["visual.merger.mlp.0.bias"].to(torch.bfloat16)
    del t["model.layers.0.mlp.up_proj.weight"]
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    n, problems = compare_hf_dirs(src, str(dst))
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "model.norm.weight: values differ" in text and "visual.merger.mlp.0.bias: dtype" in text
    assert "model.layers.0.mlp.up_proj.weight: only in" in text


@pytest.mark.parametrize("args,needle", [
    (["--tp", "4"], "not divisible by TP=4"),     # the default tiny config has 2 KV heads
    (["--pp", "3"], "do not split evenly over PP=3"),
    (["--max-shard-size", "big"], "--max-shard-size"),
])
def test_roundtrip_errors(hf_dirs, tmp_path, capsys, args, needle):
    rc = load_tool("convert_checkpoint")(["roundtrip", "--hf-dir", hf_dirs["qwen2_5_vl"], *args,
                                          "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: roundtrip failed:") and needle in err, err
    assert not (tmp_path / "work").exists() or os.listdir(tmp_path / "work") == []


def test_roundtrip_not_an_hf_dir(ckpts, tmp_path, capsys):
    rc = load_tool("convert_checkpoint")(["roundtrip", "--hf-dir", ckpts["qwen2_5_vl"]])
    err = capsys.readouterr().err
    assert rc == 2 and "config.json" in err, err
