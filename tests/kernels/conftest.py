"""Kernel tests run under the Triton interpreter (TRITON_INTERPRET=1) when no GPU is present.

The variable must be set before any @triton.jit function is created, i.e. before ``mllm_mega.kernels`` is
imported; ``mllm_mega.kernels`` also sets it itself on CPU-only machines.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Skip this directory's `gpu`-marked tests when CUDA is absent (CI also deselects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def _fast_interpreter_dot():
    """Test-speed shim: the interpreter's tl.dot calls ``np.matmul(a, b, dtype=float32)``, and numpy takes
    a non-BLAS loop when dtype= is given (~200x slower on a 64x128x64 fp32 tile). For fp32 operands the
    result is the same fp32 matmul, so route those through BLAS on contiguous copies. Other dtypes, and
    Triton versions whose interpreter lacks this hook, are left untouched."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    builder_cls = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder_cls, "create_dot", None)
    if original is None or getattr(original, "_mllm_fast", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and d.data.dtype == np.float32:
            out = np.matmul(np.ascontiguousarray(a.data), np.ascontiguousarray(b.data)) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._mllm_fast = True
    builder_cls.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _fast_interpreter_dot()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
