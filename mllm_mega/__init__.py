"""mllm_mega: a Megatron-style training system for multimodal LLMs (vision encoder + projector + LLM)."""

import os as _os

__version__ = "0.1.0"

# Triton fixes interpreter vs compiled mode when `triton` is first imported (its own jit'd library functions
# included) — and megatron-core imports triton early. Without CUDA a compiled kernel cannot run at all, so
# select the interpreter (correctness-only, slow) before anything imports triton. An explicit
# TRITON_INTERPRET setting is respected.
if "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"
