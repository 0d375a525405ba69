"""Qwen2-VL (transformers ``Qwen2VLForConditionalGeneration``): LayerNorm + QuickGELU NaViT ViT without
window attention, 2x2 patch merger, Qwen2 LLM with MRoPE (videos at a temporal interval of 1)."""
from mllm_mega.models.qwen2_vl.family import make_spec
from mllm_mega.models.registry import register

SPEC = register(make_spec("qwen2_vl", hf_architectures=("Qwen2VLForConditionalGeneration",),
                          hf_model_types=("qwen2_vl",)))
