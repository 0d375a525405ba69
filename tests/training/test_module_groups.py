"""Freezing and LR multipliers act on the module groups a family names (by module, not by parameter name).

The reference here is the parameter names (the ViT under ``vision.`` except ``vision.merger.``, the merger
under ``vision.merger.``, the LLM under ``language_model.``): an independent rule the code no longer uses.
"""
import torch

from mllm_mega.config import load_config
from mllm_mega.models import registry
from mllm_mega.parallel.initialize import initialize_distributed
from mllm_mega.training import setup


def _group_by_name(name: str) -> str:
    if name.startswith("vision.merger."):
        return "merger"
    return "vision" if name.startswith("vision.") else "llm"


def test_freeze_and_lr_multipliers_follow_the_module_groups(tmp_path):
    initialize_distributed(1, 1)
    spec = registry.get("qwen2_5_vl")
    arch = spec.parse_hf_config(spec.tiny_config())
    model = spec.build_stage(arch, kernels="torch")
    names = {id(p): n for n, p in model.named_parameters()}
    groups = setup.module_groups(model)
    assert {g: sorted(names[id(p)] for p in ps) for g, ps in groups.items()} == {
        g: sorted(n for n in names.values() if _group_by_name(n) == g) for g in ("vision", "merger", "llm")}

    # stage 1.5: LLM frozen; ViT at lr_mult 0.1, merger at 1
    cfg = load_config(None, [f"run_dir={tmp_path}", "stage.name=vit_projector", "optimizer.lr=1e-2",
                             "stage.lr_mult_merger=0.5", "parallel.distributed_optimizer=false"])
    counts = setup.apply_freeze(model, cfg)
    for n, p in model.named_parameters():
        assert p.requires_grad == (_group_by_name(n) != "llm"), n
    assert counts["llm"] == 0 and counts["vision"] > 0 and counts["merger"] > 0
    assert setup.frozen_groups(arch, cfg) == {"vision": False, "merger": False, "llm": True}
    ddp = setup.wrap_ddp(model, cfg)
    optimizer, _ = setup.build_optimizer(ddp, cfg, torch.float32)
    want = {"vision": 1e-3, "merger": 5e-3}
    seen = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = _group_by_name(names[id(p)])
            assert abs(group["max_lr"] - want[g]) < 1e-12, (names[id(p)], group["max_lr"])
            seen.add(g)
    assert seen == {"vision", "merger"}


def test_text_only_family_has_only_the_llm_group():
    spec = registry.get("qwen3")
    arch = spec.parse_hf_config(spec.tiny_config())
    cfg = load_config(None, ["stage.name=full"])
    # vision and merger do not exist: counted frozen, so the LLM's FLOPs have no upstream input gradients
    assert setup.frozen_groups(arch, cfg) == {"vision": True, "merger": True, "llm": False}
