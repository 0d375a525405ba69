"""The FLOP counter against torch's FlopCounterMode on a real forward of the model (an independent count)."""
import torch
from torch.utils.flop_counter import FlopCounterMode

from mllm_mega.models.qwen2_vl.configuration import arch_from_hf_config
from mllm_mega.models.qwen2_vl.family import build_model
from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict
from mllm_mega.parallel.initialize import initialize_distributed
from mllm_mega.models.qwen2_vl.flops import llm_forward_flops, vision_forward_flops
from mllm_mega.training.flops import pack_flops, training_multipliers


def _pack(arch):
    """Two samples (with 2 images of different sizes, one with a partial window) and no padding."""
    grid = torch.tensor([[1, 8, 12], [1, 20, 4]])
    num_img = [int(g.prod()) // 4 for g in grid]
    seg = [num_img[0] + 7, num_img[1] + 11]
    ids = torch.randint(0, 400, (sum(seg),))
    ids[2:2 + num_img[0]] = arch.image_token_id
    ids[seg[0] + 3:seg[0] + 3 + num_img[1]] = arch.image_token_id
    pos = torch.arange(sum(seg)).expand(3, -1).contiguous()
    cu = torch.tensor([0, seg[0], sum(seg)], dtype=torch.int32)
    pixels = torch.randn(int(grid.prod(-1).sum()), arch.vision.patch_dim)
    return ids, pos, cu, pixels, grid, seg


def test_flops_match_flop_counter_mode():
    initialize_distributed(1, 1)
    for family in ("qwen2_5_vl", "qwen2_vl"):
        arch = arch_from_hf_config(tiny_hf_config_dict(family))
        model = build_model(arch, kernels="torch").eval()
        ids, pos, cu, pixels, grid, seg = _pack(arch)
        counter = FlopCounterMode(display=False)
        with counter:
            model(ids, pos, cu, pixel_values=pixels, image_grid_thw=grid)
        ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        linear = sum(n for op, n in ops.items() if op in ("aten.mm", "aten.addmm"))
        attention = ops.get("aten.bmm", 0)
        v = vision_forward_flops(arch, grid)
        full = llm_forward_flops(arch, seg, causal=False)  # the torch reference computes full score matrices
        assert linear == v["linear"] + v["merger"] + full["linear"], (family, linear, v, full)
        assert attention == v["attention"] + full["attention"], (family, attention, v, full)
        causal = llm_forward_flops(arch, seg)
        assert causal["attention"] < full["attention"] and causal["linear"] == full["linear"]


def test_training_multipliers_and_padding_excluded():
    assert training_multipliers({"vision": False, "merger": False, "llm": False}) == \
        {"vision": 2, "merger": 3, "llm": 3}
    # stage 1: frozen ViT runs forward only; the frozen LLM still back-propagates to the merger
    assert training_multipliers({"vision": True, "merger": False, "llm": True}) == \
        {"vision": 1, "merger": 2, "llm": 2}
    arch = arch_from_hf_config(tiny_hf_config_dict("qwen2_5_vl"))
    mult = training_multipliers({"vision": False, "merger": False, "llm": False})
    pack = {"cu_seqlens": torch.tensor([0, 30, 50, 64], dtype=torch.int32), "num_real_tokens": 50,
            "image_grid_thw": torch.tensor([[1, 4, 4]])}
    padded = dict(pack, num_real_tokens=64)
    v = vision_forward_flops(arch, pack["image_grid_thw"])
    expect = 2 * (v["linear"] + v["attention"]) + 3 * v["merger"] + 3 * sum(llm_forward_flops(arch, [30, 20]).values())
    assert pack_flops(arch, pack, mult) == expect
    assert pack_flops(arch, padded, mult) > expect  # the padding segment is counted only when it is real
