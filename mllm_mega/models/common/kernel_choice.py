"""The ``kernels`` switch shared by the layer specs and the loss slot: torch | triton | auto."""
from __future__ import annotations

KERNEL_CHOICES = ("auto", "torch", "triton")


def resolve_kernels(kernels: str) -> str:
    """``auto`` = Triton on CUDA, torch on CPU."""
    import torch

    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r}; expected one of {KERNEL_CHOICES}")
    if kernels == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return kernels
