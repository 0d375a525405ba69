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


def _hide_wandb_from_megatron() -> None:
    """megatron-core's ``import megatron.core`` tries ``import wandb`` (timers, inference contexts), ~1 s per
    process when wandb is installed, for code paths we never use (megatron's timers' W&B writer, its
    inference engine). Make that one optional import fail for megatron's own modules only; ours
    (``training/metrics.py``, when ``logging.wandb_project`` is set) imports wandb as usual.
    ``MLLM_MEGA_MEGATRON_WANDB=1`` turns this off."""
    import sys

    if _os.environ.get("MLLM_MEGA_MEGATRON_WANDB") == "1" or "wandb" in sys.modules:
        return

    class _HideWandbFromMegatron:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != "wandb":
                return None
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                frame = frame.f_back  # skip the import machinery: the first other frame did `import wandb`
            if frame is not None and str(frame.f_globals.get("__name__", "")).startswith("megatron."):
                raise ModuleNotFoundError("wandb hidden from megatron-core by mllm_mega", name="wandb")
            return None

    sys.meta_path.insert(0, _HideWandbFromMegatron)


_hide_wandb_from_megatron()
