"""mllm_mega: a Megatron-style training system for multimodal LLMs (vision encoder + projector + LLM)."""

__version__ = "0.1.0"
