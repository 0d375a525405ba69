"""Every example config loads, and the GPU configs' layouts fit the Qwen2.5-VL sizes they name.

The HF config.json files are not available offline, so the head counts and sizes of the released models are
written out here (Qwen2.5-VL-3B / -7B config.json values).
"""
import glob
import os
import re

import pytest

from mllm_mega.config import load_config
from tests.conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))
GPU_CONFIGS = [p for p in CONFIGS if os.path.basename(p).startswith("qwen2_5_vl_")]
PREFERENCE_CONFIGS = [p for p in GPU_CONFIGS if re.search(r"_(dpo|mpo)\.yaml$", p)]
STAGE_CONFIGS = [p for p in GPU_CONFIGS if p not in PREFERENCE_CONFIGS]

# Qwen2.5-VL released sizes: LLM (layers, q heads, kv heads, ffn, vocab), ViT (heads, ffn)
KNOWN = {
    "3B": dict(layers=36, heads=16, kv_heads=2, ffn=11008, vocab=151936, vision_heads=16, vision_ffn=3420),
    "7B": dict(layers=28, heads=28, kv_heads=4, ffn=18944, vocab=152064, vision_heads=16, vision_ffn=3420),
}
STAGES = {"stage1": "projector", "stage1_5": "vit_projector", "stage2": "full", "stage3_long": "full"}


def _name(path):
    return os.path.basename(path)


def _size(cfg):
    """The released size the config's arch / init_from names (3B, 7B), or None."""
    m = re.search(r"Qwen2\.5-VL-(\d+B)", f"{cfg.model.arch} {cfg.model.init_from}", re.IGNORECASE)
    return m.group(1).upper() if m else None


def test_there_are_example_configs():
    assert any(_name(p) == "tiny_synthetic.yaml" for p in CONFIGS)
    assert {_name(p) for p in GPU_CONFIGS} >= {f"qwen2_5_vl_{s}_{st}.yaml" for s in ("3b", "7b") for st in STAGES
                                               if st != "stage3_long"} | {"qwen2_5_vl_7b_stage3_long.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    assert cfg.run_dir


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=_name)
def test_gpu_config_layout_fits_the_model(path):
    cfg = load_config(path)
    size = _size(cfg)
    assert size in KNOWN, f"{_name(path)}: cannot tell the model size from arch={cfg.model.arch!r}"
    m, p = KNOWN[size], cfg.parallel
    tp, pp = p.tp, p.pp * p.cp  # context parallel: CP ranks belong to the model replica too
    assert m["kv_heads"] % tp == 0 and m["heads"] % tp == 0, f"TP={tp} does not divide the LLM heads of {size}"
    assert m["vision_heads"] % tp == 0 and m["vision_ffn"] % tp == 0, f"TP={tp} does not divide the ViT of {size}"
    assert m["vocab"] % tp == 0 and m["ffn"] % tp == 0
    assert (tp * pp) <= 8 and 8 % (tp * pp) == 0, "a model replica should fit in (and divide) an 8-GPU node"
    if pp > 1:
        first = p.num_llm_layers_in_first_stage
        if first is None:
            assert m["layers"] % pp == 0
        else:
            rest = m["layers"] - first
            assert 0 < first < m["layers"] and rest % (pp - 1) == 0
            assert first <= rest // (pp - 1), "stage 0 also runs the ViT: give it no more LLM layers than the others"
    # global batch: a multiple of micro-batch x DP for any whole number of 8-GPU nodes up to 8 (powers of two)
    for nodes in (1, 2, 4, 8):
        dp = nodes * 8 // (tp * pp)
        assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * dp) == 0, (nodes, dp)


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=_name)
def test_gpu_config_stage_recipe(path):
    """Stage, starting weights and LR follow the three-stage recipe (1 -> 1.5 -> 2)."""
    cfg = load_config(path)
    m = re.match(r"qwen2_5_vl_(\d+b)_(stage1|stage1_5|stage2|stage3_long)\.yaml$", _name(path))
    assert m, _name(path)
    size, stage = m.groups()
    assert cfg.stage.name == STAGES[stage]
    assert cfg.model.dtype == "auto" and cfg.model.kernels == "auto"
    assert cfg.data.loss_reweighting == "square"
    assert cfg.data.data_path and cfg.data.tokenizer_dir
    assert cfg.checkpoint.async_save == "auto"
    assert cfg.run_dir.endswith(f"qwen2_5_vl_{size}_{stage}")
    previous = {"stage1_5": "stage1", "stage2": "stage1_5", "stage3_long": "stage2"}.get(stage)
    if previous is None:
        assert cfg.model.init_from and not cfg.model.init_from.endswith("/checkpoints")  # an import-hf output
        assert cfg.stage.freeze_vision and cfg.stage.freeze_llm and not cfg.stage.freeze_merger
    else:
        prev = load_config(os.path.join(os.path.dirname(path), f"qwen2_5_vl_{size}_{previous}.yaml"))
        assert os.path.normpath(cfg.model.init_from) == os.path.normpath(os.path.join(prev.run_dir, "checkpoints"))
        assert cfg.optimizer.lr < prev.optimizer.lr
        assert cfg.stage.lr_mult_vision < 1.0 and not cfg.stage.freeze_vision


def test_preference_configs():
    """Qwen2.5-VL-7B DPO and MPO after stage 2: ViT frozen, LR 1e-6, InternVL2.5-MPO's weights and lengths."""
    names = {_name(p): p for p in PREFERENCE_CONFIGS}
    assert set(names) == {"qwen2_5_vl_7b_dpo.yaml", "qwen2_5_vl_7b_mpo.yaml"}
    stage2 = load_config(os.path.join(ROOT, "examples", "configs", "qwen2_5_vl_7b_stage2.yaml"))
    for name, path in names.items():
        cfg = load_config(path)
        o = cfg.objective
        assert o.name == "preference" and o.beta == 0.1
        assert cfg.stage.freeze_vision and not cfg.stage.freeze_llm and cfg.optimizer.lr == 1e-6
        assert os.path.normpath(cfg.model.init_from) == os.path.normpath(os.path.join(stage2.run_dir, "checkpoints"))
        assert cfg.data.seq_len >= 2 * 8192  # a pair (one packing unit) of two sequences of up to 8192 tokens
        assert cfg.run_dir.endswith(name[:-len(".yaml")])
    dpo, mpo = load_config(names["qwen2_5_vl_7b_dpo.yaml"]), load_config(names["qwen2_5_vl_7b_mpo.yaml"])
    assert (dpo.objective.weight_preference, dpo.objective.weight_quality, dpo.objective.weight_generation) == (1, 0, 0)
    assert (mpo.objective.weight_preference, mpo.objective.weight_quality, mpo.objective.weight_generation) == \
        (0.8, 0.2, 1.0)
    assert dpo.objective.reference == "resident" and mpo.objective.reference == "precomputed"


# Valley2.5 recipe configs: Qwen2-VL-7B ViT (16 heads, ffn 5120) + Qwen3-8B (36 layers, 32 / 8 heads, vocab 151936)
VALLEY = dict(layers=36, heads=32, kv_heads=8, vocab=151936, vision_heads=16, vision_ffn=5120)


def test_valley_recipe_configs():
    """stage 1 (projector, from the composed import) -> stage 2 (full, from stage 1), layouts fit the sizes."""
    one = load_config(os.path.join(ROOT, "examples", "configs", "valley2_5_stage1_projector.yaml"))
    two = load_config(os.path.join(ROOT, "examples", "configs", "valley2_5_stage2_full.yaml"))
    assert one.stage.name == "projector" and two.stage.name == "full"
    assert os.path.normpath(two.model.init_from) == os.path.normpath(os.path.join(one.run_dir, "checkpoints"))
    assert two.optimizer.lr < one.optimizer.lr and two.stage.lr_mult_vision < 1.0
    for cfg in (one, two):
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        assert all(VALLEY[k] % tp == 0 for k in ("heads", "kv_heads", "vocab", "vision_heads", "vision_ffn"))
        assert VALLEY["layers"] % pp == 0 and 8 % (tp * pp) == 0
        assert cfg.train.global_batch_size % (8 // (tp * pp)) == 0


# Open-Qwen2VL recipe (ANCHORS.md): Qwen2.5-1.5B (28 layers, 12 / 2 heads, vocab 151936) + SigLIP-SO400M (16 heads)
OPEN_QWEN2VL = dict(layers=28, heads=12, kv_heads=2, vocab=151936, vision_heads=16)


def test_open_qwen2vl_recipe_configs():
    """pretraining (144 tokens, LR 5e-5, wd 0.01) -> SFT (729 tokens, LR 2e-5, wd 0.1, batch 128), both frozen ViT
    with projector + LLM training, 4096-token packs; SFT starts from the pretraining run; the tiny config is
    the 144-token stage too."""
    configs = os.path.join(ROOT, "examples", "configs")
    one = load_config(os.path.join(configs, "open_qwen2vl_stage1_pretrain.yaml"))
    two = load_config(os.path.join(configs, "open_qwen2vl_stage2_sft.yaml"))
    tiny = load_config(os.path.join(configs, "tiny_open_qwen2vl.yaml"))
    assert one.model.arch_overrides == {"projector_pool_grid": 12} == tiny.model.arch_overrides
    assert two.model.arch_overrides == {"projector_pool_grid": 27}
    assert (one.optimizer.lr, one.optimizer.weight_decay) == (5e-5, 0.01)
    assert (two.optimizer.lr, two.optimizer.weight_decay, two.train.global_batch_size) == (2e-5, 0.1, 128)
    assert os.path.normpath(two.model.init_from) == os.path.normpath(os.path.join(one.run_dir, "checkpoints"))
    for cfg in (one, two, tiny):
        s = cfg.stage
        assert s.freeze_vision and not s.freeze_merger and not s.freeze_llm
    for cfg in (one, two):
        assert cfg.data.seq_len == 4096
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        assert all(OPEN_QWEN2VL[k] % tp == 0 for k in ("heads", "kv_heads", "vocab", "vision_heads"))
        assert OPEN_QWEN2VL["layers"] % pp == 0 and 8 % (tp * pp) == 0
        for nodes in (1, 2, 4, 8):
            assert cfg.train.global_batch_size % (nodes * 8 // (tp * pp)) == 0
