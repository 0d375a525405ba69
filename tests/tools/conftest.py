import importlib.util
import os

import pytest
import torch

from tests.conftest import ROOT, run_cmd


def load_tool(name):
    """The ``main`` of ``tools/<name>.py``, to call in-process (error paths: no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Tiny random HF directories (built here, nothing downloaded):

    * ``qwen2_5_vl``: untied, one ``model.safetensors``; ``qwen2_vl``: tied, sharded with an index (100KB);
    * ``q25_seed7``: the Qwen2.5-VL architecture again with other weights;
    * ``wide_bf16``: Qwen2.5-VL with LLM width 96, 4 KV heads and 4 ViT heads (TP=4 divides everything; the
      default tiny config has 2 KV / 2 ViT heads, so TP<=2), stored in bfloat16.
    """
    from mllm_mega.models.qwen2_vl.tiny import build_tiny_hf_model

    root = tmp_path_factory.mktemp("hf")
    dirs = {name: os.path.join(root, name) for name in ("qwen2_5_vl", "qwen2_vl", "q25_seed7", "wide_bf16")}
    build_tiny_hf_model("qwen2_5_vl", seed=1).save_pretrained(dirs["qwen2_5_vl"])
    build_tiny_hf_model("qwen2_vl", seed=1, tie_word_embeddings=True).save_pretrained(dirs["qwen2_vl"],
                                                                                       max_shard_size="100KB")
    build_tiny_hf_model("qwen2_5_vl", seed=7).save_pretrained(dirs["q25_seed7"])
    wide = build_tiny_hf_model("qwen2_5_vl", seed=3, hidden_size=96, num_key_value_heads=4,
                               vision_overrides={"num_heads": 4})
    wide.to(torch.bfloat16).save_pretrained(dirs["wide_bf16"])
    return dirs


@pytest.fixture(scope="session")
def ckpts(hf_dirs, tmp_path_factory):
    """hf_dirs imported (in-process import_hf: the import CLI itself is tested in tests/models)."""
    from mllm_mega.checkpoint.convert import import_hf

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, hf_dir in hf_dirs.items():
        out[name] = os.path.join(root, name)
        import_hf(hf_dir, out[name], progress=False)
    return out


@pytest.fixture(scope="session")
def resaved(ckpts, tmp_path_factory):
    """Checkpoints written by a TP=2 run (Qwen2.5-VL) and by a PP=2 run (Qwen2-VL, tied): `reshard` under
    torchrun loads the imported checkpoint at that layout and saves it from there."""
    root = tmp_path_factory.mktemp("resaved")
    out = {}
    for name, family, layout in (("tp2", "qwen2_5_vl", ["--tp", "2"]), ("pp2", "qwen2_vl", ["--pp", "2"])):
        dst = os.path.join(root, name)
        res = run_cmd(["tools/convert_checkpoint.py", "reshard", "--load", ckpts[family], "--out", dst, *layout],
                      nproc=2)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = dst
    return out


def assert_nothing_written(out, parent=None):
    """``out`` does not exist and no temporary directory was left next to it."""
    assert not os.path.exists(out), f"{out} was written"
    parent = parent or os.path.dirname(out)
    if os.path.isdir(parent):
        leftovers = [p for p in os.listdir(parent) if p.startswith((".export-", ".merge-", ".graft-", ".reshard-"))]
        assert leftovers == [], leftovers
