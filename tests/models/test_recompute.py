"""Activation recomputation (``model.recompute_{llm,vision}``): same loss and gradients, and it really re-runs.

One forward/backward of a tiny Qwen2.5-VL (window + full ViT layers, several images) per setting, in this
process at TP1. The reference is the same model without recomputation; forward hooks count how often each
tower's core-attention slot, MLP and layers run, so a knob that silently does nothing fails.
"""
import pytest
import torch

from mllm_mega.config import load_config
from mllm_mega.models.qwen2_vl.configuration import Recompute, arch_from_hf_config
from mllm_mega.models.qwen2_vl.inputs import random_inputs
from mllm_mega.models.qwen2_vl.family import build_model
from mllm_mega.models.vlm import pack_hf_batch
from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict
from mllm_mega.parallel.initialize import initialize_distributed, set_seed
from mllm_mega.training.loss import weighted_loss_sum
from mllm_mega.training.setup import recompute_of

DEPTH = 4  # tiny config: 4 ViT layers, 4 LLM layers


@pytest.fixture(scope="module")
def case():
    initialize_distributed(1, 1)
    arch = arch_from_hf_config(tiny_hf_config_dict("qwen2_5_vl"))
    inputs = random_inputs(arch, "multi_image", seed=0)
    ids, pos, cu, _ = pack_hf_batch(arch, inputs["input_ids"], inputs["attention_mask"],
                                    image_grid_thw=inputs["image_grid_thw"])
    labels = torch.roll(ids, -1)
    labels[-1] = -100
    return arch, {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "labels": labels,
                  "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}


def _run(arch, batch, dtype=torch.float32, **recompute):
    set_seed(0)  # identical initial weights in every build
    model = build_model(arch, params_dtype=dtype, **recompute)
    counts = {}

    def counter(key):
        def hook(module, args, output):
            counts[key] = counts.get(key, 0) + 1
        return hook

    for name, module in model.named_modules():
        tower = "vision" if name.startswith("vision.") else "llm"
        for part in ("core_attention", "mlp"):
            if name.endswith(f".{part}"):
                module.register_forward_hook(counter(f"{tower}.{part}"))
        if name.split(".")[-2:-1] == ["layers"]:
            module.register_forward_hook(counter(f"{tower}.layer"))
    logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                   pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"])
    loss = weighted_loss_sum(logits, batch["labels"], torch.ones(batch["labels"].shape), kernels="torch")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, counts


@pytest.fixture(scope="module")
def reference(case):
    return {dtype: _run(*case, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


def _rc(granularity, method="uniform", num_layers=1):
    return Recompute(granularity, method, num_layers)


# (recompute_vision, recompute_llm, extra forward calls expected per counter)
SETTINGS = {
    "llm_selective": (None, _rc("selective"), {"llm.core_attention": DEPTH}),
    "vision_selective": (_rc("selective"), None, {"vision.core_attention": DEPTH}),
    "both_selective": (_rc("selective"), _rc("selective"),
                       {"vision.core_attention": DEPTH, "llm.core_attention": DEPTH}),
    "llm_full_uniform2": (None, _rc("full", "uniform", 2),
                          {"llm.layer": DEPTH, "llm.core_attention": DEPTH, "llm.mlp": DEPTH}),
    "vision_full_uniform": (_rc("full"), None,
                            {"vision.layer": DEPTH, "vision.core_attention": DEPTH, "vision.mlp": DEPTH}),
    "both_full_block1": (_rc("full", "block", 1), _rc("full", "block", 1),
                         {f"{t}.{p}": 1 for t in ("vision", "llm") for p in ("layer", "core_attention", "mlp")}),
}


# every setting in fp32, two of them also in bf16 (the GPU recipes' dtype)
PARAMS = [pytest.param(n, torch.float32, id=f"{n}-fp32") for n in SETTINGS] + \
    [pytest.param(n, torch.bfloat16, id=f"{n}-bf16") for n in ("llm_full_uniform2", "both_selective")]


@pytest.mark.parametrize("name, dtype", PARAMS)
def test_recompute_same_loss_and_grads_and_reruns(case, reference, name, dtype):
    vision, llm, extra = SETTINGS[name]
    loss0, grads0, counts0 = reference[dtype]
    loss, grads, counts = _run(*case, dtype=dtype, recompute_vision=vision, recompute_llm=llm)
    # the backward re-runs the same deterministic ops on the same inputs: bit-identical (measured: 0 diff)
    assert torch.equal(loss, loss0)
    for n in grads0:
        assert torch.equal(grads[n], grads0[n]), n
    assert counts0 == {f"{t}.{p}": DEPTH for t in ("vision", "llm") for p in ("layer", "core_attention", "mlp")}
    assert counts == {k: v + extra.get(k, 0) for k, v in counts0.items()}, counts


def test_config_knobs_reach_the_model(case):
    """model.recompute_* in the run config -> build_model: the ViT recomputes whole layers, the LLM attention."""
    cfg = load_config(None, ["model.recompute_vision=full", "model.recompute_llm=selective",
                             "model.recompute_method=block", "model.recompute_num_layers=2"])
    _, _, counts = _run(*case, **recompute_of(cfg))
    assert counts["vision.layer"] == DEPTH + 2 and counts["llm.layer"] == DEPTH
    assert counts["llm.core_attention"] == 2 * DEPTH


@pytest.mark.parametrize("override, message", [
    ("model.recompute_llm=partial", "model.recompute_llm must be one of"),
    ("model.recompute_num_layers=0", "model.recompute_num_layers"),
    ("model.recompute_method=chunks", "model.recompute_method"),
])
def test_bad_recompute_config_names_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_uniform_chunk_must_divide_the_layers(case):
    arch, _ = case
    with pytest.raises(ValueError, match="llm: recompute num_layers=3"):
        build_model(arch, recompute_llm=_rc("full", "uniform", 3))
