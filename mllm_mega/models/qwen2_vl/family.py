"""The :class:`~mllm_mega.models.registry.FamilySpec` of the Qwen2-VL-style families (Qwen2-VL, Qwen2.5-VL):
NaViT ViT -> 2x2 patch merger -> Qwen2 LLM with MRoPE. Both families share every function here; what differs
(ViT norm/MLP, window attention, video time scale) is read from the parsed architecture, never from its name.
"""
from __future__ import annotations

import dataclasses

from mllm_mega.models.registry import FamilySpec, lazy

_PKG = "mllm_mega.models.qwen2_vl"


def loader_options(arch) -> dict:
    """build_train_loader kwargs: the merge size of the processor and the MRoPE time scale of videos."""
    return {"spatial_merge_size": arch.vision.spatial_merge_size,
            "tokens_per_second": arch.vision.tokens_per_second}


def eval_options(arch) -> dict:
    return {"spatial_merge_size": arch.vision.spatial_merge_size}


def verify_inputs(arch) -> dict:
    from mllm_mega.models.qwen2_vl.inputs import CASES, random_inputs

    return {c: random_inputs(arch, c) for c in CASES}


def module_groups(model) -> dict:
    """{vision: ViT parameters, merger: patch-merger parameters, llm: LLM parameters} of one stage, by module
    (not by parameter name); a later pipeline stage has no vision/merger parameters."""
    groups = {"vision": [], "merger": [], "llm": list(model.language_model.parameters())}
    if model.vision is not None:
        merger = {id(p) for p in model.vision.merger.parameters()}
        for p in model.vision.parameters():
            groups["merger" if id(p) in merger else "vision"].append(p)
    return groups


def processor_config(arch, data_cfg) -> dict:
    """The preprocessor_config.json that matches the data settings, so an export loads with AutoProcessor."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    v = arch.vision
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "size": {"shortest_edge": data_cfg.min_pixels, "longest_edge": data_cfg.max_pixels},
        "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
    }


def graft_hf_config(vision_cfg: dict, llm_cfg: dict) -> dict:
    """``llm_cfg`` with ``vision_cfg``'s vision_config, whose merger output width is set to the LLM's width:
    ``hidden_size`` in Qwen2-VL-style vision configs (whose ViT width is ``embed_dim``), else
    ``out_hidden_size``."""
    import copy

    from mllm_mega.models.registry import arch_from_hf_config

    out = copy.deepcopy(llm_cfg)
    vision = copy.deepcopy(vision_cfg["vision_config"])
    vision["hidden_size" if "embed_dim" in vision else "out_hidden_size"] = arch_from_hf_config(llm_cfg).text.hidden_size
    out["vision_config"] = vision
    return out


def build_model(arch, layout=None, **kwargs):
    """This rank's stage: the generic :mod:`mllm_mega.models.vlm` with the Qwen2-VL ViT encoder and the 2x2
    patch merger as its parts (``kwargs``: :func:`mllm_mega.models.vlm.build_stage`'s kernels, params_dtype,
    recompute_vision, recompute_llm)."""
    from mllm_mega.models.encoders.qwen2_vit import build_encoder
    from mllm_mega.models.projectors.patch_merger import build_projector
    from mllm_mega.models.qwen2_vl.configuration import to_transformer_configs
    from mllm_mega.models.vlm import build_stage

    return build_stage(arch, layout, to_configs=to_transformer_configs, make_encoder=build_encoder,
                       make_projector=build_projector, **kwargs)


def make_spec(name: str, *, hf_architectures: tuple[str, ...], hf_model_types: tuple[str, ...],
              **overrides) -> FamilySpec:
    """The spec of a Qwen2-VL-style family; ``overrides`` replace fields (e.g. a family with the same towers
    but its own HF key names, config parser or tiny model)."""
    def tiny_config(**overrides) -> dict:
        return lazy(f"{_PKG}.tiny:tiny_hf_config_dict")(name, **overrides)

    def build_tiny_hf_model(seed: int = 0, **kwargs):
        return lazy(f"{_PKG}.tiny:build_tiny_hf_model")(name, seed=seed, **kwargs)

    spec = FamilySpec(
        name=name,
        hf_architectures=hf_architectures,
        hf_model_types=hf_model_types,
        parse_hf_config=lazy(f"{_PKG}.configuration:arch_from_hf_config"),
        build_stage=build_model,
        key_map=lazy(f"{_PKG}.hf_adapter:key_map"),
        hf_to_ours=lazy(f"{_PKG}.hf_adapter:hf_to_ours"),
        ours_to_hf=lazy(f"{_PKG}.hf_adapter:ours_to_hf"),
        normalize_hf_key=lazy(f"{_PKG}.hf_adapter:normalize_hf_key"),
        hf_key_is_known=lazy(f"{_PKG}.hf_adapter:hf_key_pattern_is_known"),
        loader_options=loader_options,
        eval_options=eval_options,
        pack_hf_batch=lazy("mllm_mega.models.vlm:pack_hf_batch"),
        verify_inputs=verify_inputs,
        pack_flops=lazy(f"{_PKG}.flops:pack_flops"),
        module_groups=module_groups,
        tiny_config=tiny_config,
        build_tiny_hf_model=build_tiny_hf_model,
        processor_config=processor_config,
        graft_hf_config=graft_hf_config,
        check_layout=lazy(f"{_PKG}.configuration:to_transformer_configs"),
    )
    return dataclasses.replace(spec, **overrides) if overrides else spec
