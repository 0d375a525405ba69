"""RMSNorm: the reference against HF's Qwen2RMSNorm, the Triton kernel (interpreter on CPU) against the
reference, output and both gradients."""
import importlib

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from mllm_mega.kernels import rms_norm, rms_norm_ref

rms_mod = importlib.import_module("mllm_mega.kernels.rmsnorm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_hf_qwen2_rmsnorm(dtype):
    hf = Qwen2RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(96))
    hf = hf.to(dtype)
    x = (3 * torch.randn(5, 7, 96)).to(dtype).requires_grad_()
    y_hf = hf(x)
    y_ref = rms_norm_ref(x, hf.weight, 1e-6)
    # the same torch ops in the same order: bit-identical
    torch.testing.assert_close(y_ref, y_hf, atol=0, rtol=0)
    dy = torch.randn_like(y_hf)
    g_hf = torch.autograd.grad(y_hf, (x, hf.weight), dy)
    g_ref = torch.autograd.grad(y_ref, (x, hf.weight), dy)
    for a, b in zip(g_ref, g_hf):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_ref_matches_formula_in_float64():
    x, w = torch.randn(4, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    expected = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    # the reference upcasts to fp32 (HF semantics) and returns float64 via the weight's promotion
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-5), expected, atol=1e-6, rtol=1e-6)


CASES = [  # (shape, x dtype, weight dtype)
    ((7, 3, 96), torch.float32, torch.float32),  # 3-D input, non-power-of-two hidden
    ((1, 64), torch.float32, torch.float32),  # one row
    ((37, 1000), torch.float32, torch.float32),  # more rows than backward programs
    ((9, 200), torch.bfloat16, torch.bfloat16),
    ((9, 200), torch.float16, torch.float16),
    ((6, 128), torch.bfloat16, torch.float32),  # fp32 weight on bf16 activations: fp32 output, as HF
]


def _tol(dtype):
    # fp32: reduction order only. 16-bit: x_hat is rounded to the input dtype in both, and a last-bit
    # difference in rstd can move that rounding by one ulp (2^-8 bf16, 2^-11 fp16 relative); the kernel's
    # dx is computed without the reference's intermediate 16-bit rounding of dy * w, so allow a few ulp.
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
            torch.float16: dict(atol=3e-3, rtol=3e-3)}[dtype]


@pytest.mark.parametrize("shape,dtype,wdtype", CASES)
def test_kernel_matches_ref(shape, dtype, wdtype):
    x = (2 * torch.randn(shape)).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1])).to(wdtype).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    y_ref = rms_norm_ref(x, w, 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, **_tol(dtype))
    dy = torch.randn_like(y_ref)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    # gradients against the exact math: the reference on fp32 copies (HF's own backward rounds dy * w
    # to 16 bits first, which is less accurate than the kernel)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_ref(x32, w32, 1e-6), (x32, w32), dy.float())
    assert dx.dtype == dtype and dw.dtype == wdtype
    torch.testing.assert_close(dx.float(), dx_ref, **_tol(dtype))
    # dw sums over rows: scale the tolerance with the row count
    rows = x.numel() // shape[-1]
    tol = _tol(dtype)
    torch.testing.assert_close(dw.float(), dw_ref, atol=tol["atol"] * rows ** 0.5, rtol=tol["rtol"])


def test_dweight_partials_cover_all_rows(monkeypatch):
    # rows not divisible by the number of backward programs: every row must land in exactly one partial
    monkeypatch.setattr(rms_mod, "BWD_PROGRAMS_CPU", 3)
    x = torch.randn(10, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    dy = torch.randn(10, 32)
    _, dw = torch.autograd.grad(rms_norm(x, w, 1e-6), (x, w), dy)
    x_hat = x.detach() * torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(dw, (dy * x_hat).sum(0), atol=1e-5, rtol=1e-5)


def test_empty_and_errors():
    w = torch.ones(16)
    assert rms_norm(torch.randn(0, 16), w, 1e-6).shape == (0, 16)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(3, 16), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(3, 16), w, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(8192, 3584), (16384, 1280), (4096, 8192)])
def test_gpu_bf16_shapes(rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-6), **_tol(torch.bfloat16))
    dy = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    dx_ref, dw_ref = torch.autograd.grad(rms_norm_ref(x32, w32, 1e-6), (x32, w32), dy.float())
    torch.testing.assert_close(dx.float(), dx_ref, **_tol(torch.bfloat16))
    # dw: fp32 accumulation over thousands of rows, then one bf16 rounding (2^-8 relative)
    torch.testing.assert_close(dw.float(), dw_ref, atol=1e-1, rtol=2e-2)
