"""Open-Qwen2VL family (``LlavaForConditionalGeneration`` with a SigLIP vision tower and a Qwen2 LLM): SigLIP
encoder -> average-pool projector (k x k tokens per image) -> Qwen2 with 1-D positions. Config parsing, options
and export in ``arch.py``, the HF key map in ``hf_keys.py``, tiny models in ``tiny.py``."""
from mllm_mega.models.registry import FamilySpec, lazy, register

_PKG = "mllm_mega.models.families.open_qwen2vl"

SPEC = register(FamilySpec(
    name="open_qwen2vl",
    hf_architectures=("LlavaForConditionalGeneration",),
    hf_model_types=("llava",),
    parse_hf_config=lazy(f"{_PKG}.arch:arch_from_hf_config"),
    build_stage=lazy(f"{_PKG}.arch:build_model"),
    key_map=lazy(f"{_PKG}.hf_keys:key_map"),
    hf_to_ours=lazy(f"{_PKG}.hf_keys:hf_to_ours"),
    ours_to_hf=lazy(f"{_PKG}.hf_keys:ours_to_hf"),
    normalize_hf_key=lazy(f"{_PKG}.hf_keys:normalize_hf_key"),
    hf_key_is_known=lazy(f"{_PKG}.hf_keys:hf_key_is_known"),
    loader_options=lazy(f"{_PKG}.arch:loader_options"),
    eval_options=lazy(f"{_PKG}.arch:eval_options"),
    pack_hf_batch=lazy(f"{_PKG}.arch:pack_hf_batch"),
    verify_inputs=lazy(f"{_PKG}.arch:verify_inputs"),
    pack_flops=lazy(f"{_PKG}.arch:pack_flops"),
    module_groups=lazy(f"{_PKG}.arch:module_groups"),
    tiny_config=lazy(f"{_PKG}.tiny:tiny_config"),
    build_tiny_hf_model=lazy(f"{_PKG}.tiny:build_tiny_hf_model"),
    processor_config=lazy(f"{_PKG}.arch:processor_config"),
    check_layout=lazy(f"{_PKG}.arch:check_layout"),
    export_hf_config=lazy(f"{_PKG}.arch:export_hf_config"),
    compose_hf=lazy(f"{_PKG}.compose:compose_from_options"),
))
