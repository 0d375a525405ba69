"""graft_vision: the grafted model's ViT computes exactly what the vision source's does, its LLM is the other
source's; the merger is kept when widths match and its output projection re-initialised when they do not."""
import json
import os

import pytest
import torch

from mllm_mega.checkpoint.io import load_full_model, resolve_checkpoint, tensor_state
from mllm_mega.checkpoint.graft import graft_vision
from mllm_mega.models.qwen2_vl.inputs import random_inputs
from mllm_mega.models.vlm import pack_hf_batch
from tests.conftest import run_cmd
from tests.tools.conftest import assert_nothing_written, load_tool


def _vision(model, inp):
    """(ViT output before the merger, vision tower output after it) on the same pixels."""
    seen = {}

    def grab(module, args, output):
        seen["vit"] = args[0].clone()  # returns None: the output is left alone

    hook = model.vision.merger.register_forward_hook(grab)
    with torch.no_grad():
        out = model.vision(inp["pixel_values"], inp["image_grid_thw"])
    hook.remove()
    return seen["vit"], out


def _check_graft(out, a_path, b_path, keep_merger):
    a = load_full_model(resolve_checkpoint(a_path))
    b_state = tensor_state(load_full_model(resolve_checkpoint(b_path)))
    g_ref = resolve_checkpoint(out)
    g = load_full_model(g_ref)
    g_state = tensor_state(g)
    # the LLM is B's, exactly
    llm = [k for k in b_state if k.startswith("language_model.")]
    assert llm and all(torch.equal(g_state[k], b_state[k]) for k in llm)
    assert set(g_state) - set(llm) == {k for k in tensor_state(a) if k.startswith("vision.")}
    # the ViT computes exactly what A's does
    inp = random_inputs(a.arch, "multi_image", seed=11)
    vit_a, out_a = _vision(a, inp)
    vit_g, out_g = _vision(g, inp)
    assert torch.equal(vit_g, vit_a)
    if keep_merger:
        assert torch.equal(out_g, out_a)
    else:
        assert out_g.shape == (out_a.shape[0], g_ref.arch.text.hidden_size) != out_a.shape
    # and the grafted model runs end to end
    ginp = random_inputs(g_ref.arch, "multi_image", seed=12)
    ids, pos, cu, index = pack_hf_batch(g_ref.arch, ginp["input_ids"], ginp["attention_mask"],
                                        ginp["image_grid_thw"])
    with torch.no_grad():
        logits = g(ids, pos, cu, pixel_values=ginp["pixel_values"], image_grid_thw=ginp["image_grid_thw"])
    assert logits.shape == (ids.numel(), g_ref.arch.text.vocab_size) and torch.isfinite(logits).all()
    return g_ref, g_state


@pytest.mark.slow
def test_graft_onto_a_wider_llm_reinitialises_the_merger_output_cli(ckpts, tmp_path):
    a_path, b_path = ckpts["qwen2_5_vl"], ckpts["wide_bf16"]  # LLM width 64 -> 96
    out = str(tmp_path / "g")
    res = run_cmd(["tools/graft_vision.py", "--vision-from", a_path, "--llm-from", b_path, "--out", out,
                   "--seed", "5"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-initialised" in res.stdout
    g_ref, g_state = _check_graft(out, a_path, b_path, keep_merger=False)
    a_state = tensor_state(load_full_model(resolve_checkpoint(a_path)))
    for k in ("vision.merger.ln_q.weight", "vision.merger.fc1.weight", "vision.merger.fc1.bias"):
        assert torch.equal(g_state[k], a_state[k]), k
    w, bias = g_state["vision.merger.fc2.weight"], g_state["vision.merger.fc2.bias"]
    assert w.shape == (96, 4 * 48) and torch.equal(bias, torch.zeros(96))
    expected = torch.randn(96, 4 * 48, generator=torch.Generator().manual_seed(5)) * 0.02
    assert torch.equal(w, expected)
    # config: B's text part and special tokens, A's vision part with the merger width set to B's
    a_cfg = json.load(open(os.path.join(a_path, "mllm_mega.json")))["hf_config"]
    b_meta = json.load(open(os.path.join(b_path, "mllm_mega.json")))
    cfg = g_ref.meta["hf_config"]
    assert cfg["text_config"] == b_meta["hf_config"]["text_config"]
    assert cfg["vision_config"] == {**a_cfg["vision_config"], "out_hidden_size": 96}
    assert cfg["image_token_id"] == b_meta["hf_config"]["image_token_id"]
    assert g_ref.meta["source_dtype"] == b_meta["source_dtype"] == "bfloat16"


def test_graft_with_matching_widths_keeps_the_merger(ckpts, tmp_path):
    a_path, b_path = ckpts["q25_seed7"], ckpts["qwen2_5_vl"]
    out = str(tmp_path / "g")
    summary = graft_vision(a_path, b_path, out)
    assert summary["merger"] == "kept"
    _check_graft(out, a_path, b_path, keep_merger=True)


@pytest.mark.parametrize("case", ["other_family", "missing", "hf_dir", "empty_dir", "out_not_empty"])
def test_graft_refusals(ckpts, hf_dirs, tmp_path, capsys, case):
    a = ckpts["qwen2_5_vl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    args, needle = {
        "other_family": (["--vision-from", ckpts["qwen2_vl"], "--llm-from", a], "is qwen2_vl but --llm-from"),
        "missing": (["--vision-from", a, "--llm-from", str(tmp_path / "nope")], "--llm-from"),
        "hf_dir": (["--vision-from", hf_dirs["qwen2_5_vl"], "--llm-from", a], "--vision-from"),
        "empty_dir": (["--vision-from", a, "--llm-from", str(empty)], "is not an mllm_mega checkpoint"),
        "out_not_empty": (["--vision-from", a, "--llm-from", a], "exists and is not an empty directory"),
    }[case]
    if case == "out_not_empty":
        out.mkdir()
        (out / "keep").write_text("x")
    rc = load_tool("graft_vision")([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: graft failed:") and needle in err, err
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep"]
    else:
        assert_nothing_written(str(out))
