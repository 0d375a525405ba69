"""Qwen2 / Qwen2.5 text LLMs (transformers ``Qwen2ForCausalLM``): QKV bias, head_dim = hidden / heads."""
from mllm_mega.models.llms.family import make_text_spec
from mllm_mega.models.registry import register

SPEC = register(make_text_spec("qwen2", architecture="Qwen2ForCausalLM", model_type="qwen2", kind="qwen2"))
