"""Qwen3 dense text LLMs (transformers ``Qwen3ForCausalLM``): per-head q/k RMSNorm before RoPE, no QKV bias,
explicit head_dim, tied embeddings in the small sizes."""
from mllm_mega.models.llms.family import make_text_spec
from mllm_mega.models.registry import register

SPEC = register(make_text_spec("qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3", kind="qwen3"))
