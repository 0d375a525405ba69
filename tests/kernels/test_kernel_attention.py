"""Varlen attention: the torch reference against dense masked SDPA, the Triton kernel against the reference.

CPU runs use the Triton interpreter with fp32 (and one fp16) inputs; bf16 and large shapes are `gpu` tests.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from mllm_mega.kernels import varlen_attention, varlen_attention_ref
from mllm_mega.kernels._tiles import build_tiles, cached_tiles

# the package exports the function `varlen_attention`, which shadows the submodule attribute
va = importlib.import_module("mllm_mega.kernels.varlen_attention")

EDGE_LENS = [1, 63, 0, 64, 65]  # length 1, around one 64-block, and an empty segment
MANY_SHORT = [3, 1, 7, 2, 0, 5, 16, 9, 4, 1, 12, 6, 2, 8]


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(lens_q, lens_k, num_heads, num_kv_heads, head_dim, dtype=torch.float32, device="cpu"):
    q = torch.randn(sum(lens_q), num_heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(sum(lens_k), num_kv_heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(sum(lens_k), num_kv_heads, head_dim, dtype=dtype, device=device, requires_grad=True)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device)


def _run(fn, q, k, v, cu_q, cu_k, causal, do):
    out = fn(q, k, v, cu_q, cu_k, int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max()),
             causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return (out, *grads)


# ---- the reference against an independent computation ----------------------------------------------
def _dense_sdpa(q, k, v, cu_q, cu_k, causal):
    """One SDPA call over the whole pack with a block-diagonal (and bottom-right causal) boolean mask."""
    seg_q = torch.repeat_interleave(torch.arange(len(cu_q) - 1), (cu_q[1:] - cu_q[:-1]).long())
    seg_k = torch.repeat_interleave(torch.arange(len(cu_k) - 1), (cu_k[1:] - cu_k[:-1]).long())
    pos_q = torch.arange(q.shape[0]) - cu_q[seg_q]  # position inside the segment
    pos_k = torch.arange(k.shape[0]) - cu_k[seg_k]
    allowed = seg_q[:, None] == seg_k[None, :]
    if causal:
        len_q, len_k = (cu_q[1:] - cu_q[:-1])[seg_q], (cu_k[1:] - cu_k[:-1])[seg_k]
        allowed &= pos_k[None, :] <= pos_q[:, None] + (len_k[None, :] - len_q[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=allowed, enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", [(EDGE_LENS, EDGE_LENS), (MANY_SHORT, MANY_SHORT),
                                           ([5, 3, 40], [9, 7, 40])])  # len_k >= len_q: every row sees a key
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 1)])
def test_ref_matches_dense_masked_sdpa(causal, lens_q, lens_k, num_heads, num_kv_heads):
    keep = [i for i, n in enumerate(lens_q) if n > 0]  # SDPA cannot express empty segments; drop them
    lens_q, lens_k = [lens_q[i] for i in keep], [lens_k[i] for i in keep]
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, num_heads, num_kv_heads, 32, torch.float32)
    do = torch.randn_like(q)
    ref = _run(varlen_attention_ref, q, k, v, cu_q, cu_k, causal, do)
    dense = _run(lambda *a, causal: _dense_sdpa(*a[:5], causal), q, k, v, cu_q, cu_k, causal, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, dense):
        # fp32 on both sides: only summation order differs (~1e-7 relative); 1e-5 still catches any
        # masking error, which is O(1)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_ref_rows_without_keys_are_zero():
    # causal with len_q > len_k: the first len_q - len_k rows see no key (flash-attn outputs 0 there);
    # an empty key segment gives 0 for all its queries.
    q, k, v, cu_q, cu_k = _inputs([6, 3], [2, 0], 2, 1, 16)
    out = varlen_attention_ref(q, k, v, cu_q, cu_k, 6, 2, causal=True)
    assert torch.all(out[:4] == 0) and torch.all(out[6:] == 0)
    assert torch.all(out[4:6].abs().sum(-1) > 0)
    # the row that sees exactly one key returns that key's value
    torch.testing.assert_close(out[4], v[0].repeat_interleave(2, 0), atol=0, rtol=0)


# ---- the kernel against the reference (interpreter on CPU) -------------------------------------------
# fp32 everywhere: the kernel and the reference differ only in summation order and exp2 vs exp, about
# 1e-6 relative at these sizes; 5e-5 / 1e-4 leaves a wide margin while catching any masking error (O(1)).
FP32_TOL = dict(atol=5e-5, rtol=1e-4)


def _check_against_ref(lens_q, lens_k, num_heads, num_kv_heads, head_dim, causal, dtype=torch.float32,
                       tol=FP32_TOL):
    q, k, v, cu_q, cu_k = _inputs(lens_q, lens_k, num_heads, num_kv_heads, head_dim, dtype)
    do = torch.randn_like(q)
    ours = _run(varlen_attention, q, k, v, cu_q, cu_k, causal, do)
    ref = _run(varlen_attention_ref, q, k, v, cu_q, cu_k, causal, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **tol, msg=name)


# head dims 64/80/128 x GQA ratios 1 and 4 on the edge lengths; the many-short mix on two of them
# (kept small: the interpreter runs every program in Python)
_CONFIGS = [("edges", 64, 1, 1), ("edges", 80, 4, 1), ("edges", 128, 4, 1), ("edges", 128, 2, 2),
            ("many_short", 64, 2, 2), ("many_short", 80, 4, 1)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_name,head_dim,num_heads,num_kv_heads", _CONFIGS)
def test_kernel_matches_ref(causal, lens_name, head_dim, num_heads, num_kv_heads):
    lens = EDGE_LENS if lens_name == "edges" else MANY_SHORT
    _check_against_ref(lens, lens, num_heads, num_kv_heads, head_dim, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_unequal_q_k_lengths(causal):
    # bottom-right causal alignment, rows without keys (len_q > len_k) and an empty key segment
    _check_against_ref([5, 70, 3, 1], [9, 60, 0, 4], 2, 1, 64, causal)


@pytest.mark.parametrize("blocks", [dict(fwd_m=32, fwd_n=16, bwd_m=16, bwd_n=32),
                                    dict(fwd_m=16, fwd_n=32, bwd_m=32, bwd_n=16)], ids=["m>n", "m<n"])
def test_kernel_other_tilings(monkeypatch, blocks):
    # several diagonal blocks per tile in both directions, so the masked/unmasked split is exercised
    monkeypatch.setattr(va, "BLOCK_OVERRIDE", blocks)
    _check_against_ref([1, 50, 0, 33, 17], [4, 45, 0, 33, 20], 4, 2, 80, True)


def test_kernel_fp16():
    # fp16 inputs: P and dS are rounded to fp16 before their matmuls, as in FlashAttention, so errors are
    # ~1e-3 relative to O(1) values; 1e-2 is loose enough for that and far below a masking bug.
    _check_against_ref([1, 33, 64, 65], [1, 33, 64, 65], 2, 1, 64, True, torch.float16, dict(atol=1e-2, rtol=1e-2))


def test_tokens_outside_segments_get_zero():
    q, k, v, _, _ = _inputs([20], [20], 2, 2, 64)
    cu = torch.tensor([0, 7, 12], dtype=torch.int32)  # tokens 12..19 are in no segment
    do = torch.randn_like(q)
    ours = _run(varlen_attention, q, k, v, cu, cu, True, do)
    ref = _run(varlen_attention_ref, q, k, v, cu, cu, True, do)
    assert torch.all(ours[0][12:] == 0) and torch.all(ours[1][12:] == 0) and torch.all(ours[2][12:] == 0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_default_scale_and_explicit_scale():
    q, k, v, cu, _ = _inputs([10, 6], [10, 6], 2, 2, 64)
    a = varlen_attention(q, k, v, cu, cu, 10, 10, softmax_scale=0.3, causal=True)
    b = varlen_attention_ref(q, k, v, cu, cu, 10, 10, softmax_scale=0.3, causal=True)
    c = varlen_attention(q, k, v, cu, cu, 10, 10, softmax_scale=1 / math.sqrt(64), causal=True)
    d = varlen_attention(q, k, v, cu, cu, 10, 10, causal=True)
    torch.testing.assert_close(a, b, **FP32_TOL)
    torch.testing.assert_close(c, d, atol=0, rtol=0)
    assert (a - d).abs().max() > 1e-3  # the scale is really used


# ---- the tile schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("work", ["full", "causal_q", "causal_k"])
def test_tiles_cover_each_block_once(work):
    lens = [0, 1, 63, 64, 65, 0, 130, 7]
    cu = _cu(lens)
    tiles = build_tiles(cu, cu, 64, sum(lens), work)
    valid = tiles[:, tiles[0] >= 0]
    expected = {(s, b) for s, n in enumerate(lens) for b in range(math.ceil(n / 64))}
    got = [tuple(t) for t in valid.t().tolist()]
    assert len(got) == len(set(got)) and set(got) == expected
    assert torch.all(tiles[0][valid.shape[1]:] == -1)  # unused tail after all valid tiles
    if work == "causal_q":  # heaviest first: the last block of the 130-long segment comes first
        assert tuple(tiles[:, 0].tolist()) == (6, 2)


def test_tile_cache_follows_identity_and_version():
    cu = _cu([5, 70])
    a = cached_tiles(cu, cu, 64, 75, "full")
    assert cached_tiles(cu, cu, 64, 75, "full") is a
    cu_copy = cu.clone()
    assert cached_tiles(cu_copy, cu_copy, 64, 75, "full") is not a
    cu[1:] = torch.tensor([70, 75], dtype=torch.int32)  # in-place edit bumps the version counter
    b = cached_tiles(cu, cu, 64, 75, "full")
    assert b is not a and not torch.equal(a, b)


# ---- input validation -----------------------------------------------------------------------------
def test_input_errors_name_the_tensor():
    q, k, v, cu, _ = _inputs([8], [8], 4, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        varlen_attention(q, k, v, cu.long(), cu, 8, 8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        varlen_attention(q, k[:, :1].expand(8, 3, 64), v[:, :1].expand(8, 3, 64), cu, cu, 8, 8)
    with pytest.raises(ValueError, match="k"):
        varlen_attention(q, k.half(), v, cu, cu, 8, 8)
    with pytest.raises(ValueError, match="stride"):
        varlen_attention(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, cu, cu, 8, 8)
    with pytest.raises(ValueError, match="head_dim"):
        varlen_attention(q[..., :60], k[..., :60], v[..., :60], cu, cu, 8, 8)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, torch.tensor([0, 9], dtype=torch.int32), cu, 8, 8)


# ---- GPU: bf16 and production shapes ----------------------------------------------------------------
def _lowp_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """Per-segment SDPA in the inputs' (low) precision: the error budget a bf16 kernel is held to."""
    outs = []
    for s in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1),
                                           is_causal=causal, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def _mixed_lens(total, seed, lo=1, hi=2048):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(lo, hi + 1, (1,), generator=g)))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llm_8192_causal", "vit_windows", "vit_images"])
def test_gpu_bf16_large(case):
    if case == "llm_8192_causal":  # Qwen2.5-VL-7B LLM: 28 q heads, 4 kv heads (GQA 7:1), hd128
        lens, heads, kv_heads, hd, causal = _mixed_lens(8192, 0), 28, 4, 128, True
    elif case == "vit_windows":  # 64-patch windows, 16 heads, hd80
        lens, heads, kv_heads, hd, causal = [64] * 60 + [16, 32, 48, 1], 16, 16, 80, False
    else:  # whole-image segments up to 4096 patches
        lens, heads, kv_heads, hd, causal = [4096, 1024, 900, 64, 4], 16, 16, 80, False
    q, k, v, cu_q, cu_k = _inputs(lens, lens, heads, kv_heads, hd, torch.bfloat16, "cuda")
    do = torch.randn_like(q)
    ours = _run(varlen_attention, q, k, v, cu_q, cu_k, causal, do)
    ref = _run(varlen_attention_ref, q, k, v, cu_q, cu_k, causal, do)  # fp32 math on the bf16 inputs
    lowp = _run(_lowp_sdpa, q, k, v, cu_q, cu_k, causal, do)
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), ours, ref, lowp):
        assert torch.isfinite(a).all(), name
        err, budget = (a.float() - r.float()).abs().max().item(), (b.float() - r.float()).abs().max().item()
        # as flash-attn's tests: at most twice the error of a bf16 PyTorch computation, plus slack
        assert err <= 2 * budget + 1e-3, f"{name}: max err {err:.3e} vs bf16 SDPA {budget:.3e}"


@pytest.mark.gpu
def test_gpu_fp16_matches_ref_edges():
    q, k, v, cu_q, cu_k = _inputs(EDGE_LENS + MANY_SHORT, EDGE_LENS + MANY_SHORT, 8, 2, 128, torch.float16, "cuda")
    do = torch.randn_like(q)
    ours = _run(varlen_attention, q, k, v, cu_q, cu_k, True, do)
    ref = _run(varlen_attention_ref, q, k, v, cu_q, cu_k, True, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        # fp16 P/dS in the matmuls (as FlashAttention): ~1e-3 relative errors on O(1) values
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2, msg=name)
