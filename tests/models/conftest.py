import os

import pytest

from mllm_mega.models.qwen2_vl.tiny import build_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """HF directories of tiny random models: Qwen2.5-VL (untied, unsharded) and Qwen2-VL (tied, sharded)."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for family, kwargs, shard in (("qwen2_5_vl", {}, None), ("qwen2_vl", {"tie_word_embeddings": True}, "100KB")):
        path = os.path.join(root, family)
        model = build_tiny_hf_model(family, seed=1, **kwargs)
        if shard:
            model.save_pretrained(path, max_shard_size=shard)
        else:
            model.save_pretrained(path)
        dirs[family] = path
    return dirs


@pytest.fixture(scope="session")
def imported(tiny_hf_dirs, tmp_path_factory):
    """mllm_mega checkpoints imported from the tiny HF directories (through the CLI)."""
    from tests.conftest import run_cmd

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family, hf_dir in tiny_hf_dirs.items():
        dst = os.path.join(root, family)
        res = run_cmd(["tools/convert_checkpoint.py", "import-hf", "--hf-dir", hf_dir, "--out", dst])
        assert res.returncode == 0, res.stderr[-3000:]
        out[family] = dst
    return out
