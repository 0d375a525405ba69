"""import-hf on bad HF directories fails with a clear message and leaves nothing at --out."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_cmd


def _copy(src, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def _import_in_process(hf_dir, out, capsys):
    """The CLI's main() in this process: the same code path as the command without a new interpreter that
    imports torch and megatron again (~10 s each on the CI machine); one case below runs the real command."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", os.path.join(ROOT, "tools",
                                                                                         "convert_checkpoint.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    rc = cli.main(["import-hf", "--hf-dir", str(hf_dir), "--out", str(out)])
    return types.SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)


def _import(hf_dir, out):
    return run_cmd(["tools/convert_checkpoint.py", "import-hf", "--hf-dir", str(hf_dir), "--out", str(out)])


def _mutate_weights(hf_dir, fn):
    path = hf_dir / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _mutate_config(hf_dir, fn):
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


CASES = {
    "missing_tensor": (lambda d: _mutate_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "model.layers.1.mlp.up_proj.weight"),
    "wrong_shape": (lambda d: _mutate_weights(d, lambda t: t.__setitem__(
        "visual.blocks.0.attn.proj.weight", t["visual.blocks.0.attn.proj.weight"][:, :-1].contiguous())),
        "visual.blocks.0.attn.proj.weight"),
    "unknown_architecture": (lambda d: _mutate_config(d, lambda c: (c.__setitem__("architectures", ["LlavaForX"]),
                                                                    c.__setitem__("model_type", "llava"))),
                             "unsupported architecture"),
    "unsupported_config": (lambda d: _mutate_config(d, lambda c: c["text_config"].__setitem__("hidden_act", "gelu")),
                           "text_config.hidden_act"),
    "missing_config_key": (lambda d: _mutate_config(d, lambda c: c.pop("image_token_id")), "image_token_id"),
    "no_weights": (lambda d: os.remove(d / "model.safetensors"), "model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_hf_dir_fails_cleanly(tiny_hf_dirs, tmp_path, case, capsys):
    mutate, needle = CASES[case]
    hf_dir = _copy(tiny_hf_dirs["qwen2_5_vl"], tmp_path)
    mutate(hf_dir)
    out = tmp_path / "out"
    res = _import(hf_dir, out) if case == "missing_tensor" else _import_in_process(hf_dir, out, capsys)
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr, res.stderr[-2000:]
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".import-")] == []


def test_not_a_directory(tmp_path, capsys):
    res = _import_in_process(tmp_path / "nope", tmp_path / "out", capsys)
    assert res.returncode == 2 and "is not a directory" in res.stderr
    assert not (tmp_path / "out").exists()
