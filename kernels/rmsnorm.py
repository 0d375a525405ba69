"""RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) forward and backward in Triton, HF Qwen2RMSNorm semantics.

y = weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype), over the last dim; the output dtype is
torch's promotion of weight's and x's dtypes, like HF's. Used in the Qwen2.5-VL LLM and ViT blocks.
The backward writes dx in one pass per row (recomputing x_hat from the saved 1/rms) and accumulates dweight
in fp32: each program owns a strided set of rows and writes one partial row sum, then a small torch sum
reduces the partials (no atomics, deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._counts import count_launch

# ---- tuning constants ----------------------------------------------------------------------------
# Not yet tuned on a GPU. One row per forward program with the whole row in registers (hidden sizes up
# to 8192 in one block); warps grow with the row so each thread holds ~8-16 elements.
MAX_BLOCK_N = 65536
# Backward programs per streaming multiprocessor: each writes one fp32 partial of dweight, so
# 4 * SMs partials (a few MB at most) keep every SM busy while the final torch sum stays cheap.
BWD_PROGRAMS_PER_SM = 4
BWD_PROGRAMS_CPU = 4  # interpreter: few programs, each looping over many rows


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


# ---- reference (the specification) ------------------------------------------------------------------
def rms_norm_ref(x, weight, eps):
    """HF Qwen2RMSNorm: weight * (x_fp32 * rsqrt(mean(x_fp32^2, -1) + eps)).to(x.dtype). Differentiable."""
    x32 = x.to(torch.float32)
    x_hat = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_hat.to(x.dtype)


# ---- Triton kernels -------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, stride_x, stride_y, num_cols, eps,
                         BLOCK_N: tl.constexpr):
    """Per row: rstd = 1/sqrt(mean(x^2) + eps); y = float(w) * float((x * rstd).to(x dtype)) -> Y dtype.

    X (rows, num_cols) any float; W (num_cols,); Y (rows, num_cols); RSTD (rows,) fp32 saved for backward.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < num_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / num_cols + eps)
    x_hat = (x32 * rstd).to(x.dtype).to(tl.float32)  # HF rounds x_hat to x's dtype before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * x_hat).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(X, W, DY, DX, RSTD, DW_PARTIAL, stride_x, stride_dy, stride_dx,
                         num_rows, num_cols, rows_per_program, BLOCK_N: tl.constexpr):
    """dx = rstd * (g - x_hat * mean(g * x_hat)), g = dy * w, x_hat = x * rstd (all fp32);
    DW_PARTIAL[pid] = sum over this program's rows of dy * x_hat_rounded (the x_hat that met the weight).

    Program pid handles rows [pid * rows_per_program, (pid + 1) * rows_per_program).
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < num_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_rows)
    x_ptr = X + row_start.to(tl.int64) * stride_x  # 64-bit pointers, advanced one row per step
    dy_ptr = DY + row_start.to(tl.int64) * stride_dy
    dx_ptr = DX + row_start.to(tl.int64) * stride_dx
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x.to(tl.float32) * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, 0) / num_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat.to(x.dtype).to(tl.float32)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(DW_PARTIAL + pid * num_cols + cols, dw, mask=mask)


# ---- launchers ------------------------------------------------------------------------------------
def _check_inputs(x, weight, eps):
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"rms_norm: x must be a float tensor (..., hidden), got {getattr(x, 'dtype', type(x))}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must be a float tensor of shape ({x.shape[-1]},), got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if triton.next_power_of_2(x.shape[-1]) > MAX_BLOCK_N:
        raise ValueError(f"rms_norm: hidden size {x.shape[-1]} exceeds {MAX_BLOCK_N}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be > 0, got {eps}")


def _as_rows(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fwd(x, weight, eps):
    x2 = _as_rows(x)
    num_rows, num_cols = x2.shape
    y = torch.empty((num_rows, num_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows > 0:
        block_n = triton.next_power_of_2(num_cols)
        count_launch("rms_norm_fwd")
        _rms_norm_fwd_kernel[(num_rows,)](x2, weight, y, rstd, x2.stride(0), y.stride(0), num_cols, float(eps),
                                          BLOCK_N=block_n, num_warps=_num_warps(block_n))
    return y.reshape(x.shape), x2, rstd


def _bwd(dy, x2, weight, rstd, x_shape):
    num_rows, num_cols = x2.shape
    dy2 = _as_rows(dy)
    dx = torch.empty((num_rows, num_cols), dtype=x2.dtype, device=x2.device)
    if num_rows == 0:
        return dx.reshape(x_shape), torch.zeros_like(weight)
    if x2.is_cuda:
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        num_programs = min(num_rows, BWD_PROGRAMS_PER_SM * sms)
    else:
        num_programs = min(num_rows, BWD_PROGRAMS_CPU)
    rows_per_program = triton.cdiv(num_rows, num_programs)
    num_programs = triton.cdiv(num_rows, rows_per_program)
    dw_partial = torch.empty((num_programs, num_cols), dtype=torch.float32, device=x2.device)
    block_n = triton.next_power_of_2(num_cols)
    count_launch("rms_norm_bwd")
    _rms_norm_bwd_kernel[(num_programs,)](
        x2, weight, dy2, dx, rstd, dw_partial, x2.stride(0), dy2.stride(0), dx.stride(0),
        num_rows, num_cols, rows_per_program, BLOCK_N=block_n, num_warps=_num_warps(block_n))
    return dx.reshape(x_shape), dw_partial.sum(0).to(weight.dtype)


# ---- autograd ------------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = _fwd(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _bwd(dy, x2, weight, rstd, ctx.x_shape)
        return dx, (dw if ctx.needs_input_grad[1] else None), None


# ---- public API ----------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """RMSNorm over the last dim of x (..., hidden) with weight (hidden,); HF Qwen2RMSNorm numerics.

    Output dtype: torch.promote_types(x.dtype, weight.dtype). Differentiable in x and weight.
    """
    _check_inputs(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)
