"""Valley2.5 family (``ValleyForConditionalGeneration``, ``model_type: valley``; HF side in ``hf/``): the
Qwen2-VL NaViT vision tower + 2x2 merger (LayerNorm, QuickGELU MLP, no windows) and the Qwen3 LLM part, with
MRoPE positions (``mrope_section`` over Qwen3's head_dim) or 1-D positions (``position_mode: "1d"``).

The towers, model, key map (Qwen2-VL's ``visual.*`` names, Qwen3's ``model.*`` names) and FLOPs are the
Qwen2-VL family's (``make_spec``); what is Valley's own is in ``arch.py`` (config parsing, positions, tiny
config, export with the remote-code files) and ``compose.py`` (the recipe's starting checkpoint)."""
from mllm_mega.models.qwen2_vl.family import make_spec
from mllm_mega.models.registry import lazy, register

_ARCH = "mllm_mega.models.families.valley.arch"

SPEC = register(make_spec(
    "valley", hf_architectures=("ValleyForConditionalGeneration",), hf_model_types=("valley",),
    parse_hf_config=lazy(f"{_ARCH}:arch_from_hf_config"),
    pack_hf_batch=lazy(f"{_ARCH}:pack_hf_batch"),
    loader_options=lazy(f"{_ARCH}:loader_options"),
    eval_options=lazy(f"{_ARCH}:eval_options"),
    verify_inputs=lazy(f"{_ARCH}:verify_inputs"),
    tiny_config=lazy(f"{_ARCH}:tiny_config"),
    build_tiny_hf_model=lazy(f"{_ARCH}:build_tiny_hf_model"),
    export_hf_config=lazy(f"{_ARCH}:export_hf_config"),
    hf_code_files=lazy(f"{_ARCH}:hf_code_files"),
    compose_hf=lazy("mllm_mega.models.families.valley.compose:compose_from_options"),
))
