"""tools/compose_model.py: Qwen2-VL vision tower + Qwen3 LLM -> a Valley HF directory (trust_remote_code).

References are the source directories themselves: their safetensors (read directly), transformers'
``Qwen2VLForConditionalGeneration`` (vision features) and ``Qwen3ForCausalLM`` (text logits).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import run_cmd
from tests.tools.conftest import load_tool

PATCH = 3 * 2 * 14 * 14


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: one intra-op thread is as fast and does not fight the other jobs of a loaded 2-core CI
    machine (measured there: the generate test 88 s with 2 threads, 1.8 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny random sources: Qwen2-VL (merger width 64), Qwen3 width 64 untied, Qwen3 width 96 tied."""
    from mllm_mega.models.families.valley.tiny import write_tiny_qwen2_vl_dir, write_tiny_qwen3_dir

    root = tmp_path_factory.mktemp("valley_src")
    return {"root": str(root), "qwen2_vl": write_tiny_qwen2_vl_dir(str(root / "qwen2_vl"), seed=0),
            "qwen3": write_tiny_qwen3_dir(str(root / "qwen3"), seed=1),
            "qwen3_wide": write_tiny_qwen3_dir(str(root / "qwen3_wide"), seed=2, hidden_size=96, tie=True)}


@pytest.fixture(scope="module")
def composed(sources, tmp_path_factory):
    """Default (MRoPE) composition of matching widths, through the tool's main() in-process."""
    out = str(tmp_path_factory.mktemp("valley_out") / "valley")
    assert load_tool("compose_model")(["--family", "valley", "--vision-from", sources["qwen2_vl"], "--llm-from", sources["qwen3"],
                                       "--out", out]) == 0
    return out


def test_cli_is_a_real_command(sources, tmp_path):
    """The one real command-line run (an early error: a fresh interpreter imports no model code for it)."""
    out = str(tmp_path / "out")
    res = run_cmd(["tools/compose_model.py", "--family", "valley", "--vision-from", sources["qwen3"], "--llm-from", sources["qwen3"],
                   "--out", out])
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr.startswith("error: compose failed: --vision-from") and "expected 'qwen2_vl'" in res.stderr
    assert not os.path.exists(out)


def _tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _load(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__  # the dir's own code
    return model.eval()


def _text_logits_diff(model, qwen3_dir, vocab=300):
    from transformers import Qwen3ForCausalLM

    ref = Qwen3ForCausalLM.from_pretrained(qwen3_dir, attn_implementation="eager").eval()
    ids = torch.randint(7, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()


def test_composed_dir_loads_and_matches_its_sources(sources, composed):
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    cfg = json.load(open(os.path.join(composed, "config.json")))
    assert cfg["auto_map"]["AutoModelForImageTextToText"] == "modeling_valley.ValleyForConditionalGeneration"
    assert cfg["position_mode"] == "mrope" and cfg["mrope_section"] == [4, 3, 3]
    tok = AutoTokenizer.from_pretrained(composed, trust_remote_code=True)
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        assert cfg[key] == tok.convert_tokens_to_ids(token), key
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                     tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt  # the Qwen2-VL dir's vision chat template

    # every tensor, key for key, is the source's (no LLM tensor of the Qwen2-VL dir, no vision one invented)
    got, vis, llm = _tensors(composed), _tensors(sources["qwen2_vl"]), _tensors(sources["qwen3"])
    want = {**{k: v for k, v in vis.items() if k.startswith("visual.")}, **llm}
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)

    model = _load(composed)
    src = Qwen2VLForConditionalGeneration.from_pretrained(sources["qwen2_vl"], attn_implementation="eager").eval()
    grid = torch.tensor([[1, 4, 6], [2, 2, 4]])
    pixels = torch.randn(int(grid.prod(-1).sum()), PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.get_image_features(pixels, grid),
                           src.model.visual(pixels, grid_thw=grid).pooler_output)
    # text only: MRoPE with three equal rows is Qwen3's 1-D RoPE; measured max |diff| 0.0 (fp32, CPU, eager)
    assert _text_logits_diff(model, sources["qwen3"]) <= 1e-6

    # generate() through the directory's own code: same tokens as argmax over full forwards
    c = model.config
    ids = torch.tensor([[9, 12, c.vision_start_token_id] + [c.image_token_id] * 6 + [c.vision_end_token_id, 40]])
    img = {"pixel_values": pixels[:24], "image_grid_thw": grid[:1]}
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids=ids, **img, max_new_tokens=4, do_sample=False)
        loop = ids
        for _ in range(4):
            loop = torch.cat([loop, model(input_ids=loop, **img).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, loop)


def test_widths_differ_reinitialise_only_the_merger_output(sources, tmp_path):
    out = str(tmp_path / "wide")
    rc = load_tool("compose_model")(["--family", "valley", "--vision-from", sources["qwen2_vl"], "--llm-from", sources["qwen3_wide"],
                                     "--out", out, "--position-mode", "1d", "--seed", "5", "--max-shard-size", "300KB"])
    assert rc == 0
    assert len([n for n in os.listdir(out) if n.endswith(".safetensors")]) > 1  # sharded, loaded through the index
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["vision_config"]["hidden_size"] == 96 and cfg["position_mode"] == "1d" and cfg["tie_word_embeddings"]
    got, vis, llm = _tensors(out), _tensors(sources["qwen2_vl"]), _tensors(sources["qwen3_wide"])
    assert "lm_head.weight" not in got  # tied
    std = json.load(open(os.path.join(sources["qwen3_wide"], "config.json"))).get("initializer_range", 0.02)
    w = got.pop("visual.merger.mlp.2.weight")
    assert torch.equal(w, torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * std)  # documented init
    assert w.shape == (96, vis["visual.merger.mlp.0.weight"].shape[0])
    assert torch.equal(got.pop("visual.merger.mlp.2.bias"), torch.zeros(96))
    want = {**{k: v for k, v in vis.items() if k.startswith("visual.") and ".mlp.2." not in k},
            **{k: v for k, v in llm.items() if k != "lm_head.weight"}}
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)  # ln_q, mlp.0 kept
    assert _text_logits_diff(_load(out), sources["qwen3_wide"]) <= 1e-6


def _broken_copy(src, dst, how):
    shutil.copytree(src, dst)
    weights = os.path.join(dst, "model.safetensors")
    if how == "missing_tensor":
        state = load_file(weights)
        del state["model.layers.2.mlp.up_proj.weight"]
        save_file(state, weights)
    elif how == "corrupt":
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    elif how == "no_vision_tokens":
        path = os.path.join(dst, "tokenizer.json")
        text = open(path).read().replace("<|image_pad|>", "<|imgpad|>")
        open(path, "w").write(text)
    return dst


@pytest.mark.parametrize("case,match", [
    ("missing_dir", "is not a directory"),
    ("llm_is_qwen2_vl", "expected 'qwen3'"),
    ("missing_tensor", "missing tensor 'model.layers.2.mlp.up_proj.weight'"),
    ("corrupt", "unreadable safetensors"),
    ("no_vision_tokens", "no '<|image_pad|>' token"),
    ("out_not_empty", "exists and is not an empty directory"),
])
def test_bad_inputs_exit_2_and_write_nothing(sources, tmp_path, capsys, case, match):
    vision, llm = sources["qwen2_vl"], sources["qwen3"]
    out = str(tmp_path / "out")
    if case == "missing_dir":
        vision = str(tmp_path / "nope")
    elif case == "llm_is_qwen2_vl":
        llm = sources["qwen2_vl"]
    elif case == "out_not_empty":
        os.makedirs(out)
        open(os.path.join(out, "keep.txt"), "w").write("x")
    else:
        llm = _broken_copy(llm, str(tmp_path / "broken"), case)
    rc = load_tool("compose_model")(["--family", "valley", "--vision-from", vision, "--llm-from", llm, "--out", out])
    assert rc == 2
    assert match in capsys.readouterr().err
    if case == "out_not_empty":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".compose-")]
