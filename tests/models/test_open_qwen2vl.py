"""The open_qwen2vl family (LLaVA with a SigLIP tower and a Qwen2 LLM; average-pool projector) against
transformers: the SigLIP encoder vs ``SiglipVisionModel``'s hidden state of the chosen layer (TP1 here, TP2 in
the torchrun launch), ``verify`` at TP1 / TP2 / PP2 (text, one image, three images in a sequence, a batch of
two), export -> transformers loads it -> the same logits, a bit-identical round trip, the pool (brute force and
inside the model), the export refusal of a pooled model, rejected LLaVA variants and ``model.arch_overrides``.
The tiny tower has head_dim 24 (not a power of two), 42 px images (3 x 3 patches).
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from tests.conftest import ROOT, run_cmd

# fp32 logits of ours vs transformers: measured <= 2.4e-7 at TP1 (reduction order only)
ATOL = 1e-6
# SigLIP hidden states (|x| up to 5.8): measured 4.3e-6, already after the patch embedding, where HF's fp32
# Conv2d itself differs from an fp64 reference by 1.3e-6 (588-term dot products in another order than our Linear)
ENC_ATOL = 1e-5


def _checks():
    spec = importlib.util.spec_from_file_location("open_qwen2vl_checks",
                                                  os.path.join(ROOT, "tests/models/open_qwen2vl_checks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def brute_force_pool(x: torch.Tensor, g: int, k: int) -> torch.Tensor:
    """(N, g*g, C) -> (N, k*k, C): AdaptiveAvgPool2d's bins written out (rows floor(i*g/k) .. ceil((i+1)*g/k))."""
    n, _, c = x.shape
    x = x.view(n, g, g, c)
    out = []
    for i in range(k):
        for j in range(k):
            r0, r1, c0, c1 = i * g // k, -(-(i + 1) * g // k), j * g // k, -(-(j + 1) * g // k)
            out.append(x[:, r0:r1, c0:c1].double().mean((1, 2)))
    return torch.stack(out, 1).float()


@pytest.fixture(scope="module")
def oq_dirs(tmp_path_factory):
    """A tiny LLaVA(SigLIP + Qwen2) HF directory and its import."""
    from mllm_mega.checkpoint.convert import import_hf
    from mllm_mega.models import registry

    base = tmp_path_factory.mktemp("open_qwen2vl")
    model = registry.get("open_qwen2vl").build_tiny_hf_model(seed=1)
    model.save_pretrained(base / "hf")
    import_hf(str(base / "hf"), str(base / "ckpt"), progress=False)
    return str(base / "hf"), str(base / "ckpt")


def test_pool_and_patches_match_brute_force():
    """The pool equals AdaptiveAvgPool2d's bins on a non-divisible grid (27 -> 12) and is the identity at the
    patch grid; siglip_patches + a Linear is the HF Conv2d patch embedding."""
    from mllm_mega.models.encoders.siglip import siglip_patches
    from mllm_mega.models.projectors.avg_pool import pool_patch_grid

    x = torch.randn(2, 27 * 27, 5, generator=torch.Generator().manual_seed(0))
    ours = pool_patch_grid(x.reshape(-1, 5), 2, 27, 12).view(2, 144, 5)
    assert (ours - brute_force_pool(x, 27, 12)).abs().max() < 1e-6  # measured 2.4e-7: means of 9 or 4 values
    assert torch.equal(pool_patch_grid(x.reshape(-1, 5), 2, 27, 27), x.reshape(-1, 5))
    conv = torch.nn.Conv2d(3, 8, 14, 14)
    img = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        ref = conv(img).flatten(2).transpose(1, 2).reshape(-1, 8)  # row-major over the 2 x 3 patch grid
        ours = siglip_patches(img, 14) @ conv.weight.reshape(8, -1).T + conv.bias
    assert (ours - ref).abs().max() < 1e-5  # fp32 conv vs matmul order (measured ~1e-6)


def test_siglip_encoder_matches_transformers_tp1():
    """The hidden state after block 2 of 3 (LLaVA's vision_feature_layer -2): not the last block, no
    post_layernorm."""
    diff, scale = _checks().encoder_max_diff(1, num_layers_used=2)
    assert diff <= ENC_ATOL and scale > 1.0, (diff, scale)


def test_rejects_other_llava_variants(oq_dirs, tmp_path, capsys):
    """A LLaVA config with a CLIP tower, a Llama LLM, a pooling head or CLS-dropping selection is an error
    naming the field (parse, and import-hf through the CLI)."""
    import sys

    from mllm_mega.models.registry import arch_from_hf_config
    from mllm_mega.models.families.open_qwen2vl.tiny import tiny_config

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import main

    cases = [(("vision_config", "model_type"), "clip_vision_model", "vision_config.model_type"),
             (("text_config", "model_type"), "llama", "text_config.model_type"),
             (("vision_config", "vision_use_head"), True, "vision_config.vision_use_head"),
             (("vision_feature_select_strategy",), "default", "vision_feature_select_strategy")]
    for path, value, field in cases:
        cfg = tiny_config()
        (cfg[path[0]] if len(path) == 2 else cfg)[path[-1]] = value
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            arch_from_hf_config(cfg)
    bad = tmp_path / "clip_hf"
    shutil.copytree(oq_dirs[0], bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["vision_config"]["model_type"] = "clip_vision_model"
    json.dump(cfg, open(bad / "config.json", "w"))
    assert main(["import-hf", "--hf-dir", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "vision_config.model_type" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_verify_export_roundtrip(oq_dirs, tmp_path):
    """verify at TP1 on every case; export is bit-identical to the source and transformers loads it with the
    same logits; the round trip of a tied-embedding model is bit-identical too."""
    from transformers import LlavaForConditionalGeneration

    from mllm_mega.checkpoint.convert import verify
    from mllm_mega.checkpoint.export import compare_hf_dirs, export_hf, roundtrip
    from mllm_mega.models import registry

    hf_dir, ckpt = oq_dirs
    assert verify(hf_dir, ckpt)[0] <= ATOL
    out = str(tmp_path / "export")
    export_hf(ckpt, out, progress=False)
    n, problems = compare_hf_dirs(hf_dir, out)
    pairs = registry.get("open_qwen2vl").key_map(registry.load_arch(hf_dir))
    assert problems == [] and n == sum(len(hf_keys) for _, hf_keys, _ in pairs)
    arch = registry.load_arch(out)
    inp = registry.get("open_qwen2vl").verify_inputs(arch)["multi_image"]
    inp.pop("image_grid_thw")
    with torch.no_grad():
        a = LlavaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager")(**inp).logits
        b = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager")(**inp).logits
    assert torch.equal(a, b)
    tied = str(tmp_path / "tied")  # tied embeddings: no lm_head tensor on either side
    registry.get("open_qwen2vl").build_tiny_hf_model(seed=2, tie_word_embeddings=True).save_pretrained(tied)
    rep = roundtrip(tied, progress=False)
    assert rep["problems"] == [] and rep["tensors"] == n - 1


def test_pool_grid_model_and_export_refusal(oq_dirs, tmp_path, capsys):
    """projector_pool_grid=2 (4 tokens from the 3 x 3 grid, the same weights): the tower + pool + projector
    equal transformers' tower -> brute-force pool -> LLaVA projector; export-hf refuses it, naming why."""
    import sys

    from transformers import LlavaForConditionalGeneration

    from mllm_mega.checkpoint.convert import import_hf
    from mllm_mega.models import registry
    from mllm_mega.models.layout import ParallelLayout
    from mllm_mega.training import checkpointing as ckpt

    hf_dir = tmp_path / "pooled_hf"
    shutil.copytree(oq_dirs[0], hf_dir)
    cfg = json.load(open(hf_dir / "config.json"))
    cfg["projector_pool_grid"] = 2
    json.dump(cfg, open(hf_dir / "config.json", "w"))
    pooled = str(tmp_path / "pooled_ckpt")
    import_hf(str(hf_dir), pooled, progress=False)
    arch = registry.load_arch(str(hf_dir))
    assert arch.vision.tokens_per_image == 4
    model = registry.spec_of(arch).build_stage(arch, ParallelLayout()).eval()
    ckpt.load_model_weights(pooled, model)
    hf = LlavaForConditionalGeneration.from_pretrained(oq_dirs[0], attn_implementation="eager").eval()
    pixels = torch.randn(3, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.vision(pixels, torch.tensor([[1, 3, 3]] * 3))
        feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        ref = hf.model.multi_modal_projector(brute_force_pool(feats, 3, 2)).reshape(-1, ours.shape[-1])
    assert ours.shape == (12, 64) and (ours - ref).abs().max() <= ENC_ATOL
    # the embedding scatter counts k*k = 4 placeholders per image (not the 9 patches)
    ids = torch.tensor([8, 9] + [arch.image_token_id] * 12 + [10])
    grid = torch.tensor([[1, 3, 3]] * 3)
    with torch.no_grad():
        emb = model.embed(ids, pixels, grid)
    assert torch.equal(emb[2:14, 0], ours)
    with pytest.raises(ValueError, match="27 image placeholder tokens in input_ids but the image grids give 12"):
        model.embed(torch.tensor([arch.image_token_id] * 27), pixels, grid)

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import main

    out = tmp_path / "export"
    assert main(["export-hf", "--load", pooled, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot express" in err and "projector_pool_grid" in err and "2x2 = 4 tokens" in err, err
    assert not os.path.exists(out)


def test_key_map_in_memory_and_legacy_names_and_flops():
    """transformers' in-memory names and the hub's older ``vision_tower.vision_model.*`` names normalise to the
    on-disk names; HF -> ours -> HF gives every tensor back exactly; forward_flops = torch's FlopCounterMode on a
    real forward (pool grid 2: the projector runs on 4 tokens per image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mllm_mega.models import registry
    from mllm_mega.models.families.open_qwen2vl.arch import forward_flops
    from mllm_mega.models.families.open_qwen2vl.tiny import tiny_config
    from mllm_mega.parallel.initialize import initialize_distributed

    spec = registry.get("open_qwen2vl")
    hf = spec.build_tiny_hf_model(seed=3)
    arch = spec.parse_hf_config(tiny_config())
    mem = hf.state_dict()
    assert any(k.startswith("model.vision_tower.embeddings.") for k in mem)  # transformers 5 in-memory names
    legacy = {k.replace("model.vision_tower.", "vision_tower.vision_model.") if k.startswith("model.vision_tower.")
              else k: v for k, v in mem.items()}
    for names in (mem, legacy):
        sd = {spec.normalize_hf_key(k): v for k, v in names.items()}
        assert all(spec.hf_key_is_known(k) for k in names)
        back = dict(spec.ours_to_hf(arch, dict(spec.hf_to_ours(arch, sd.__getitem__)).__getitem__))
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    initialize_distributed(1, 1)
    arch = spec.parse_hf_config(tiny_config(projector_pool_grid=2))
    model = spec.build_stage(arch).eval()
    seg = [4 + 7, 2 * 4 + 5]
    ids = torch.randint(7, 400, (sum(seg),))
    ids[2:6] = ids[14:22] = arch.image_token_id
    cu = torch.tensor([0, seg[0], sum(seg)], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in seg]).expand(3, -1).contiguous()
    counter = FlopCounterMode(display=False)
    with counter:
        model(ids, pos, cu, pixel_values=torch.randn(3, 3, 42, 42), image_grid_thw=torch.tensor([[1, 3, 3]] * 3))
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    counted = sum(n for op, n in ops.items() if op in ("aten.mm", "aten.addmm", "aten.bmm"))
    f = forward_flops(arch, 3, seg, causal=False)  # the torch reference computes full score matrices
    assert counted == f["vision"] + f["merger"] + f["llm"], (ops, f)


def test_arch_overrides(tmp_path):
    """model.arch_overrides sets the pool grid of a tiny arch (carried in its hf_config); a mistyped key is an
    error naming it and the nearest field."""
    from types import SimpleNamespace

    from mllm_mega.config import ModelConfig
    from mllm_mega.models.families.open_qwen2vl.tiny import TINY_IDS
    from mllm_mega.training.setup import resolve_arch

    text = SimpleNamespace(vocab_size=300, vision_start_id=TINY_IDS["vision_start_token_id"],
                           vision_end_id=TINY_IDS["vision_end_token_id"], image_token_id=TINY_IDS["image_token_id"],
                           video_token_id=TINY_IDS["video_token_id"], end_of_text_id=0)
    cfg = SimpleNamespace(model=ModelConfig(arch="tiny_open_qwen2vl", arch_overrides={"projector_pool_grid": 2}),
                          data=SimpleNamespace(tokenizer_dir="t"))
    arch = resolve_arch(cfg, text)
    assert arch.vision.pool_grid == 2 and arch.hf_config["projector_pool_grid"] == 2
    assert resolve_arch(SimpleNamespace(model=ModelConfig(arch="tiny_open_qwen2vl"), data=cfg.data),
                        text).vision.tokens_per_image == 9  # default: the 3 x 3 patch grid, LLaVA-exact
    cfg.model = ModelConfig(arch="tiny_open_qwen2vl", arch_overrides={"projector_pool_gird": 2})
    with pytest.raises(ValueError, match="arch_overrides.projector_pool_gird.*did you mean 'projector_pool_grid'"):
        resolve_arch(cfg, text)


def test_verify_tp2_pp2_and_encoder_tp2(oq_dirs, tmp_path):
    """One torchrun launch: the SigLIP encoder at TP2 vs transformers, verify at TP2 and PP2."""
    out = tmp_path / "result.json"
    res = run_cmd([os.path.join(ROOT, "tests/models/open_qwen2vl_checks.py"), str(out), *oq_dirs], nproc=2)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    result = json.loads(out.read_text())
    diff, scale = result["encoder_tp2"]
    assert diff <= ENC_ATOL and scale > 1.0
    assert sorted(result["verify"]) == ["tp=1 pp=2", "tp=2 pp=1"]
    for case, d in result["verify"].items():
        assert d <= ATOL, (case, d)
