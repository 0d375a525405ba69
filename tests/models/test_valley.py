"""Valley2.5 family, megatron side: our model (Qwen2-VL towers + Qwen3 LLM part through the registry) against
the HF ``ValleyForConditionalGeneration`` (itself checked against a hand-assembled transformers reference in
test_valley_hf.py) on the same weights, at TP1, TP2 + sequence parallel and PP2 (MRoPE) and TP1 (1-D positions);
the export of an imported dir (bit-identical tensors, remote code, same logits under trust_remote_code) and
greedy decoding (ours = HF ``generate()``).

Tiny dirs: composed from random tiny Qwen2-VL / Qwen3 sources (vision head_dim 24, Qwen3 head_dim 20 != 64/4,
GQA 4/2, MRoPE section [4, 3, 3]). One torchrun launch runs every parallel layout (tests/models/valley_checks.py).
"""
import json
import os
import shutil

import pytest
import torch

from tests.conftest import ROOT, run_cmd

# fp32 logits of ours vs transformers: measured 2.4e-7 .. 3.3e-7 at TP1 (different reduction orders only)
ATOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a loaded 2-core machine: 2 threads thrash
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def valley_dirs(tmp_path_factory):
    """{"mrope": (hf_dir, ckpt), "1d": (hf_dir, ckpt)}: tiny composed Valley dirs and their import-hf output."""
    from mllm_mega.checkpoint.convert import import_hf
    from mllm_mega.models.families.valley.tiny import write_tiny_valley_dir

    out = {}
    for mode in ("mrope", "1d"):
        base = tmp_path_factory.mktemp(f"valley_{mode}")
        if mode == "mrope":
            write_tiny_valley_dir(str(base / "hf"), seed=5, position_mode=mode)
        else:  # the same weights with 1-D positions (what compose_model --position-mode 1d writes)
            shutil.copytree(out["mrope"][0], base / "hf")
            cfg = json.loads((base / "hf" / "config.json").read_text())
            (base / "hf" / "config.json").write_text(json.dumps({**cfg, "position_mode": "1d"}))
        import_hf(str(base / "hf"), str(base / "ckpt"), progress=False)
        out[mode] = (str(base / "hf"), str(base / "ckpt"))
    return out


def test_valley_is_registered_and_parsed(valley_dirs):
    from mllm_mega.models import registry

    for mode, (hf, _) in valley_dirs.items():
        arch = registry.load_arch(hf)
        assert arch.family == "valley" and arch.position_mode == mode
        assert arch.text.qk_norm and not arch.text.qkv_bias and arch.text.head_dim == 20
        assert arch.vision.norm == "layernorm" and not arch.vision.gated_mlp and arch.vision.window_size is None
        assert arch.text.mrope_section == ([4, 3, 3] if mode == "mrope" else [10, 0, 0])
    assert registry.family_of_hf_config({"model_type": "valley"}).name == "valley"
    # the data pipeline's positions (training packs, captioning eval): 1-D = HF's attention_mask.cumsum - 1,
    # i.e. 0..n-1 over every token of a sample, placeholders included; MRoPE = the default rule (no override)
    spec = registry.get("valley")
    one_d, mrope = (registry.load_arch(valley_dirs[m][0]) for m in ("1d", "mrope"))
    types = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
    expected = (torch.ones(1, 8, dtype=torch.long).cumsum(-1) - 1).expand(3, -1)
    for options in (spec.loader_options(one_d), spec.eval_options(one_d)):
        pos = options["position_ids_fn"](types, [(1, 4, 4)], spatial_merge_size=2)
        assert torch.equal(pos, expected)
    assert "position_ids_fn" not in spec.loader_options(mrope) and "position_ids_fn" not in spec.eval_options(mrope)
    assert spec.loader_options(mrope)["tokens_per_second"] is None  # Qwen2-VL video positions: interval 1


def test_valley_verify_tp_pp(valley_dirs, tmp_path):
    """Every verify case (text, image, several images, video, batch of two) at TP1 / TP2+SP / PP2 (MRoPE) and
    TP1 (1-D; positions are built before any TP/PP split); the MRoPE HF dir against the 1-D checkpoint must
    disagree (positions matter)."""
    out = tmp_path / "result.json"
    pairs = [":".join(valley_dirs[m]) for m in ("mrope", "1d")]
    res = run_cmd([os.path.join(ROOT, "tests/models/valley_checks.py"), str(out), *pairs], nproc=2)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    result = json.loads(out.read_text())
    assert len(result) == 5, result
    for name, diff in result.items():
        if name.startswith("mismatch"):
            assert diff > 1e-3, (name, diff)  # measured ~1e-1: MRoPE vs 1-D positions on the image cases
        else:
            assert diff <= ATOL, (name, diff)


def _hf_inputs(arch, case):
    from mllm_mega.models import registry

    inp = dict(registry.spec_of(arch).verify_inputs(arch)[case])
    inp.pop("mm_token_type_ids", None)  # the remote code derives it from input_ids
    return inp


def test_valley_export_remote_code_logits_and_generate(valley_dirs, tmp_path):
    """export-hf of an imported dir: every tensor bit-identical, config.json with auto_map + the two modeling
    files, loads with trust_remote_code=True and gives bit-identical logits to the source dir; our greedy
    decoding (training/generate.py) = HF generate() greedy tokens on the export."""
    from transformers import AutoModelForImageTextToText

    from mllm_mega.checkpoint.export import compare_hf_dirs, export_hf
    from mllm_mega.models import registry
    from mllm_mega.models.layout import ParallelLayout
    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training import checkpointing as ckpt
    from mllm_mega.training.generate import greedy_generate

    for mode, (hf, load) in valley_dirs.items():
        out = str(tmp_path / f"export_{mode}")
        export_hf(load, out, progress=False)
        n, problems = compare_hf_dirs(hf, out)
        assert problems == [] and n > 0
        cfg = json.load(open(os.path.join(out, "config.json")))
        assert cfg["auto_map"]["AutoModelForImageTextToText"] == "modeling_valley.ValleyForConditionalGeneration"
        assert cfg["position_mode"] == mode
        for name in ("configuration_valley.py", "modeling_valley.py"):
            assert open(os.path.join(out, name)).read() == open(os.path.join(hf, name)).read()
        kw = dict(trust_remote_code=True, dtype=torch.float32, attn_implementation="eager")
        exported = AutoModelForImageTextToText.from_pretrained(out, **kw).eval()
        source = AutoModelForImageTextToText.from_pretrained(hf, **kw).eval()
        arch = registry.load_arch(out)
        for case in ("image", "video", "batch"):
            inp = _hf_inputs(arch, case)
            with torch.no_grad():
                assert torch.equal(exported(**inp).logits, source(**inp).logits), (mode, case)

        # greedy decoding: HF generate() (KV cache) on the export vs ours (full re-forwards, megatron model)
        inp = _hf_inputs(arch, "image")
        spec = registry.spec_of(arch)
        initialize_distributed(1, 1)
        model = spec.build_stage(arch, ParallelLayout(), kernels="torch").eval()
        ckpt.load_model_weights(load, model)
        ids, pos, _, _ = spec.pack_hf_batch(arch, inp["input_ids"], inp["attention_mask"], inp["image_grid_thw"])
        eos = cfg["text_config"]["eos_token_id"]
        sample = {"input_ids": ids, "position_ids": pos, "pixel_values": inp["pixel_values"],
                  "image_grid_thw": inp["image_grid_thw"]}
        ours = greedy_generate(model, sample, max_new_tokens=8, stop_ids={eos}, vocab_limit=arch.text.vocab_size)
        with torch.no_grad():
            gen = exported.generate(**inp, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=eos)
        theirs = gen[0, inp["input_ids"].shape[1]:].tolist()
        theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
        assert len(ours) >= 4 and ours == theirs, (mode, ours, theirs)
