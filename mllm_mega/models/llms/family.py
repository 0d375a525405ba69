"""The :class:`~mllm_mega.models.registry.FamilySpec` of a text-only causal LM (``qwen2``, ``qwen3``)."""
from __future__ import annotations

from mllm_mega.models.registry import FamilySpec, lazy

_PKG = "mllm_mega.models.llms.causal_lm"


def make_text_spec(name: str, *, architecture: str, model_type: str, kind: str) -> FamilySpec:
    def parse(cfg: dict):
        return lazy(f"{_PKG}:parse_hf_config")(cfg, family=name, kind=kind)

    def tiny_config(**overrides) -> dict:
        return lazy(f"{_PKG}:tiny_config")(architecture, model_type, **overrides)

    def build_tiny_hf_model(seed: int = 0, **kwargs):
        return lazy(f"{_PKG}:build_tiny_hf_model")(architecture, model_type, seed=seed, **kwargs)

    return FamilySpec(
        name=name,
        hf_architectures=(architecture,),
        hf_model_types=(model_type,),
        parse_hf_config=parse,
        build_stage=lazy(f"{_PKG}:build_model"),
        key_map=lazy(f"{_PKG}:key_map"),
        hf_to_ours=lazy(f"{_PKG}:hf_to_ours"),
        ours_to_hf=lazy(f"{_PKG}:ours_to_hf"),
        normalize_hf_key=lazy(f"{_PKG}:normalize_hf_key"),
        hf_key_is_known=lazy(f"{_PKG}:hf_key_is_known"),
        loader_options=lambda arch: {},  # text samples: MRoPE ids of text are 1-D positions in three rows
        eval_options=lambda arch: {},
        pack_hf_batch=lazy(f"{_PKG}:pack_hf_batch"),
        verify_inputs=lazy(f"{_PKG}:verify_inputs"),
        pack_flops=lazy(f"{_PKG}:pack_flops"),
        module_groups=lazy(f"{_PKG}:module_groups"),
        tiny_config=tiny_config,
        build_tiny_hf_model=build_tiny_hf_model,
        processor_config=lambda arch, data_cfg: None,
        check_layout=lazy(f"{_PKG}:check_layout"),
        has_vision=False,
        groups=("llm",),
    )
