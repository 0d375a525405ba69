"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``): RMSNorm + SwiGLU NaViT ViT with window
attention and a few full-attention layers, 2x2 patch merger, Qwen2 LLM with MRoPE whose temporal ids follow
absolute time (``vision_config.tokens_per_second``), as in the Qwen2.5-VL report."""
from mllm_mega.models.qwen2_vl.family import make_spec
from mllm_mega.models.registry import register

SPEC = register(make_spec("qwen2_5_vl", hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
                          hf_model_types=("qwen2_5_vl",)))
