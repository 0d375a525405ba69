"""export-hf: checkpoints written at TP=2 / PP=2 -> HF directories that transformers loads and `verify` passes on;
dtype, sharding, hf_extra; bad inputs fail with exit code 2 and write nothing."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from mllm_mega.checkpoint.export import compare_hf_dirs, export_hf, parse_size
from tests.conftest import run_cmd
from tests.tools.conftest import assert_nothing_written, load_tool

SOURCE = {"tp2": "qwen2_5_vl", "pp2": "qwen2_vl"}


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tp2", "pp2"])
def test_export_of_a_tp2_or_pp2_checkpoint_loads_in_transformers_and_verifies(hf_dirs, resaved, tmp_path, run):
    import transformers

    out = str(tmp_path / "hf")
    res = run_cmd(["tools/convert_checkpoint.py", "export-hf", "--load", resaved[run], "--out", out,
                   "--max-shard-size", "300KB"])
    assert res.returncode == 0, res.stderr[-3000:]
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p for p in os.listdir(out) if p.endswith(".safetensors")) == shards
    for name in ("config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(out, name))
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"

    model, info = transformers.AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == json.load(open(os.path.join(hf_dirs[SOURCE[run]], "config.json")))[
        "architectures"][0]
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys

    # the export of a checkpoint saved at TP=2 / PP=2 is the source HF checkpoint again, bit for bit
    n, problems = compare_hf_dirs(hf_dirs[SOURCE[run]], out)
    assert problems == [] and n == len(index["weight_map"])

    res = run_cmd(["tools/convert_checkpoint.py", "verify", "--hf-dir", out, "--load", resaved[run]])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    max_abs = float(last.split()[0].split("=")[1])
    print(f"{run}: verify {last}")
    assert max_abs < 1e-6  # fp32: measured 2.7-3.0e-7


def test_export_dtype_and_hf_extra(hf_dirs, ckpts, tmp_path):
    # a checkpoint with tokenizer files (as a training run copies them): they are exported with the weights
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["qwen2_5_vl"], ckpt)
    (ckpt / "hf_extra" / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    out = str(tmp_path / "bf16")
    export_hf(str(ckpt), out, dtype="bf16", progress=False)
    assert json.load(open(os.path.join(out, "tokenizer_config.json"))) == {"model_max_length": 4096}
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == cfg["text_config"]["dtype"] == "bfloat16"
    src = safe_open(os.path.join(hf_dirs["qwen2_5_vl"], "model.safetensors"), "pt")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(src.keys())
    for key, shard in index["weight_map"].items():
        with safe_open(os.path.join(out, shard), "pt") as f:
            t = f.get_tensor(key)
        assert t.dtype == torch.bfloat16 and torch.equal(t, src.get_tensor(key).to(torch.bfloat16)), key

    # no hf_extra at all: generation_config.json is built from the config's special tokens
    shutil.rmtree(ckpt / "hf_extra")
    out2 = str(tmp_path / "plain")
    export_hf(str(ckpt), out2, progress=False)
    gen = json.load(open(os.path.join(out2, "generation_config.json")))
    assert gen == {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    # an iteration directory can be named instead of the root
    out3 = str(tmp_path / "from_iter")
    export_hf(str(ckpt / "iter_0000000"), out3, progress=False)
    assert compare_hf_dirs(out2, out3)[1] == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("1000") == 1000
    assert parse_size("1.5kb") == 1500
    for bad in ("5XB", "GB", "-1MB", "0", "iB"):
        with pytest.raises(ValueError, match="max-shard-size"):
            parse_size(bad)


def _bad_cases(tmp_path, hf_dirs, ckpts):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"  # tracker names an iteration whose directory is gone
    shutil.copytree(ckpts["qwen2_5_vl"], broken)
    (broken / "latest_checkpointed_iteration.txt").write_text("7")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    good = ckpts["qwen2_5_vl"]
    return {
        "missing": (["--load", str(tmp_path / "nope")], "does not exist", None),
        "hf_dir": (["--load", hf_dirs["qwen2_5_vl"]], "not an mllm_mega checkpoint", None),
        "empty_dir": (["--load", str(empty)], "not an mllm_mega checkpoint", None),
        "missing_iteration": (["--load", str(broken)], "iter_0000007", None),
        "bad_shard_size": (["--load", good, "--max-shard-size", "5XB"], "--max-shard-size", None),
        "bad_dtype": (["--load", good, "--dtype", "int8"], "dtype 'int8'", None),
        "out_not_empty": (["--load", good], "exists and is not an empty directory", str(full)),
    }


@pytest.mark.parametrize("case", ["missing", "hf_dir", "empty_dir", "missing_iteration", "bad_shard_size",
                                  "bad_dtype", "out_not_empty"])
def test_export_errors(hf_dirs, ckpts, tmp_path, capsys, case):
    args, needle, out = _bad_cases(tmp_path, hf_dirs, ckpts)[case]
    out = out or str(tmp_path / "out")
    rc = load_tool("convert_checkpoint")(["export-hf", *args, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: export-hf failed:") and needle in err, err
    if case == "out_not_empty":
        assert os.listdir(out) == ["x"]
    else:
        assert_nothing_written(out)


@pytest.mark.parametrize("case", ["missing", "hf_dir", "bad_layout"])
def test_reshard_errors(hf_dirs, ckpts, tmp_path, capsys, case):
    args, needle = {
        "missing": (["--load", str(tmp_path / "nope")], "does not exist"),
        "hf_dir": (["--load", hf_dirs["qwen2_vl"]], "not an mllm_mega checkpoint"),
        "bad_layout": (["--load", ckpts["qwen2_5_vl"], "--tp", "2"], "world size 1 is not divisible by TP=2"),
    }[case]
    out = str(tmp_path / "out")
    rc = load_tool("convert_checkpoint")(["reshard", *args, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: reshard failed:") and needle in err, err
    assert_nothing_written(out)
