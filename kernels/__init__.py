"""Triton kernels for mllm_mega, importable as ``mllm_mega.kernels``."""
