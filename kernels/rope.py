"""Fused rotary position embedding (RoPE, MRoPE, 2-D ViT RoPE) with angles computed in the kernel.

One kernel covers the three rotary variants of Qwen2.5-VL (Qwen2.5-VL technical report, arXiv:2502.13923;
MRoPE from Qwen2-VL, arXiv:2409.12191), all in the "rotate-half" (non-interleaved) layout:
- LLM MRoPE: position_ids (3, tokens) = (t, h, w), sections = mrope_section, e.g. (16, 24, 24) for hd128,
  inv_freq = 1 / theta^(arange(0, d, 2) / d);
- 1-D RoPE: position_ids (1, tokens), sections = (d/2,);
- ViT 2-D RoPE: position_ids (2, tokens) = (h, w), inv_freq = cat(f, f) with
  f = 1 / 10000^(arange(0, d/2, 2) / (d/2)), sections = (d/4, d/4).
Frequency j uses position row c(j), the section containing j: theta_j = float32(pos[c(j), t]) * inv_freq[j].
The kernel reads position ids and inv_freq (a few bytes per token) instead of cos/sin tables (4*d bytes
per token), computes cos/sin once per token and applies them to every head. The backward is the same
rotation by -theta.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._counts import count_launch

# ---- tuning constants ----------------------------------------------------------------------------
# Not yet tuned on a GPU. A program handles BLOCK_T tokens: it computes their (BLOCK_T, d/2) angles once
# and then walks the heads BLOCK_H at a time, so cos/sin cost is amortised over all heads while each
# step moves BLOCK_T * BLOCK_H * d elements (16 * 4 * 128 * 2 B = 16 KiB in bf16 at hd128).
BLOCK_T, BLOCK_H, NUM_WARPS = 16, 4, 4
# Range reduction of theta to [-pi, pi] before cos/sin, so the result does not depend on how the device
# reduces large arguments: theta - k * 2pi with 2pi = _TWO_PI_HI + _TWO_PI_LO (fp32 head and tail) and
# fused multiply-adds, each rounding once; the reduced angle is within ~2e-7 rad of the exact one for
# |theta| up to ~1e6 (positions in the 100k's with inv_freq[0] = 1).
_INV_TWO_PI = tl.constexpr(0.15915494309189535)
_TWO_PI_HI = tl.constexpr(6.2831854820251465)  # float32(2 * pi)
_TWO_PI_LO = tl.constexpr(-1.7484556025237907e-07)  # 2 * pi - _TWO_PI_HI


# ---- reference (the specification) ------------------------------------------------------------------
def section_ids(sections, device=None) -> torch.Tensor:
    """(sum(sections),) int32: the position row used by each frequency."""
    return torch.repeat_interleave(torch.arange(len(sections), dtype=torch.int32),
                                   torch.tensor(list(sections), dtype=torch.long)).to(device)


def apply_rope_ref(x, position_ids, inv_freq, sections):
    """Plain torch, fp32 math. x (tokens, heads, head_dim) -> same shape and dtype, differentiable.

    out[..., :d/2] = x1 cos - x2 sin, out[..., d/2:] = x2 cos + x1 sin with x1 = x[..., :d/2],
    x2 = x[..., d/2:], theta[t, j] = float32(position_ids[c(j), t]) * inv_freq[j].
    """
    half = x.shape[-1] // 2
    pos = position_ids[section_ids(sections, position_ids.device).long()]  # (d/2, tokens)
    theta = pos.t().to(torch.float32) * inv_freq.to(torch.float32)[None, :]  # (tokens, d/2)
    cos, sin = theta.cos()[:, None, :], theta.sin()[:, None, :]
    xf = x.to(torch.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---- Triton kernel --------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(
    X, Y, POS, INV_FREQ, SEC_ID,  # X, Y (tokens, heads, d); POS (C, tokens) int; INV_FREQ fp32, SEC_ID int32 (d/2,)
    stride_xt, stride_xh, stride_yt, stride_yh, stride_pc, stride_pt,
    num_tokens, num_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, NUM_SECTIONS: tl.constexpr, SIGN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Y1 = X1 cos - SIGN X2 sin, Y2 = X2 cos + SIGN X1 sin (SIGN = +1 forward, -1 backward), fp32 math.

    theta[t, j] = float32(POS[SEC_ID[j], t]) * INV_FREQ[j]; one program per BLOCK_T tokens, all heads.
    """
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    tok_ok = toks < num_tokens
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < HALF
    sec = tl.load(SEC_ID + j, mask=j_ok, other=0)
    inv_freq = tl.load(INV_FREQ + j, mask=j_ok, other=0.0)
    pos = tl.zeros([BLOCK_T, BLOCK_HALF], dtype=tl.float32)
    for c in tl.static_range(NUM_SECTIONS):
        pos_c = tl.load(POS + c * stride_pc + toks * stride_pt, mask=tok_ok, other=0).to(tl.float32)
        pos = tl.where(sec[None, :] == c, pos_c[:, None], pos)
    theta = pos * inv_freq[None, :]  # (BLOCK_T, BLOCK_HALF), rounded like torch's fp32 product
    turns = tl.floor(theta * _INV_TWO_PI + 0.5)
    reduced = tl.fma(-turns, _TWO_PI_LO, tl.fma(-turns, _TWO_PI_HI, theta))
    cos = tl.cos(reduced)[:, None, :]
    sin = (tl.sin(reduced) * SIGN)[:, None, :]

    toks64 = toks.to(tl.int64)
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = tok_ok[:, None, None] & (heads < num_heads)[None, :, None] & j_ok[None, None, :]
        x_ptrs = X + toks64[:, None, None] * stride_xt + heads[None, :, None] * stride_xh + j[None, None, :]
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_T, BLOCK_H, BLOCK_HALF)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        y_ptrs = Y + toks64[:, None, None] * stride_yt + heads[None, :, None] * stride_yh + j[None, None, :]
        tl.store(y_ptrs, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptrs + HALF, y2.to(Y.dtype.element_ty), mask=mask)


# ---- launcher -------------------------------------------------------------------------------------
_SEC_ID_CACHE: dict = {}


def _check_inputs(x, position_ids, inv_freq, sections):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"apply_rope: x must be a float tensor (tokens, heads, head_dim), got "
                         f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    if x.shape[2] % 2 != 0:
        raise ValueError(f"apply_rope: head_dim of x must be even, got {x.shape[2]}")
    if x.stride(-1) != 1:
        raise ValueError(f"apply_rope: x must have a contiguous last dim, got strides {x.stride()}")
    half = x.shape[2] // 2
    sections = tuple(int(s) for s in sections)
    if len(sections) == 0 or any(s < 0 for s in sections) or sum(sections) != half:
        raise ValueError(f"apply_rope: sections {sections} must be non-negative and sum to head_dim // 2 = {half}")
    if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.is_floating_point() or position_ids.dtype == torch.bool):
        raise ValueError("apply_rope: position_ids must be an integer tensor (num_sections, tokens)")
    if position_ids.shape != (len(sections), x.shape[0]):
        raise ValueError(f"apply_rope: position_ids has shape {tuple(position_ids.shape)}, expected "
                         f"({len(sections)}, {x.shape[0]}) = (len(sections), tokens)")
    if not isinstance(inv_freq, torch.Tensor) or inv_freq.shape != (half,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"apply_rope: inv_freq must be float32 of shape ({half},), got "
                         f"{getattr(inv_freq, 'dtype', type(inv_freq))} {tuple(getattr(inv_freq, 'shape', ()))}")
    for name, t in (("position_ids", position_ids), ("inv_freq", inv_freq)):
        if t.device != x.device:
            raise ValueError(f"apply_rope: {name} is on {t.device}, x on {x.device}")
    return sections


def _rope(x, position_ids, inv_freq, sections, sign):
    num_tokens, num_heads, head_dim = x.shape
    y = torch.empty((num_tokens, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    key = (sections, x.device)
    sec = _SEC_ID_CACHE.get(key)
    if sec is None:
        sec = _SEC_ID_CACHE[key] = section_ids(sections, x.device)
    inv_freq = inv_freq.contiguous()
    count_launch("rope_fwd" if sign > 0 else "rope_bwd")
    _rope_kernel[(triton.cdiv(num_tokens, BLOCK_T),)](
        x, y, position_ids, inv_freq, sec,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), position_ids.stride(0), position_ids.stride(1),
        num_tokens, num_heads,
        HALF=head_dim // 2, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), NUM_SECTIONS=len(sections),
        SIGN=sign, BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, num_warps=NUM_WARPS)
    return y


# ---- autograd ------------------------------------------------------------------------------------
class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, position_ids, inv_freq, sections):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.sections = sections
        return _rope(x, position_ids, inv_freq, sections, 1.0)

    @staticmethod
    def backward(ctx, dy):
        position_ids, inv_freq = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return _rope(dy, position_ids, inv_freq, ctx.sections, -1.0), None, None, None


# ---- public API ----------------------------------------------------------------------------------
def apply_rope(x, position_ids, inv_freq, sections):
    """Rotate x (tokens, heads, head_dim) by angles from position_ids (C, tokens); see the module docstring.

    Any float dtype for x (fp32 math, output in x's dtype); position_ids any integer dtype; inv_freq
    float32 (head_dim // 2,); sections: C ints summing to head_dim // 2. Differentiable in x only.
    """
    sections = _check_inputs(x, position_ids, inv_freq, sections)
    return RopeFunction.apply(x, position_ids, inv_freq, sections)
