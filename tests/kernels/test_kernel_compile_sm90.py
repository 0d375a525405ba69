"""Compile every Triton kernel for Hopper (sm_90) without a GPU.

The interpreter runs kernels as numpy code and does not catch what only the compiler rejects (non-constexpr
globals, type mismatches of loop-carried values, layouts tl.dot cannot take, shared memory over the limit).
Triton can lower to a cubin (its bundled ptxas) on a machine without CUDA, so CI compiles the
production configurations here. Runs in a subprocess because this test session uses TRITON_INTERPRET=1.
"""
import importlib
import os
import subprocess
import sys
import time

import pytest

H100_SMEM_BYTES = 227 * 1024  # max dynamic shared memory per block on sm_90


def _compile(fn, types, constexprs, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    assert kernel.metadata.shared <= H100_SMEM_BYTES, (fn.__name__, kernel.metadata.shared)
    return kernel


def _attention_cases(va):
    cases = []
    # production configurations (fp32 is for the interpreter tests only and slow to compile)
    for dtype, hd, causal, group, fwd_m in [("bf16", 128, True, 7, 128), ("bf16", 80, False, 1, 64),
                                            ("fp16", 64, True, 4, 128)]:
        p = "*" + dtype
        d_a, d_b, has_b = va._split_head_dim(hd)
        common = dict(GROUP=group, CAUSAL=causal, HEAD_DIM=hd, D_A=d_a, D_B=d_b, HAS_B=has_b,
                      DOT_PREC="ieee" if dtype == "fp32" else "tf32")
        ints = {n: "i32" for n in ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                   "stride_ot", "stride_oh", "stride_dot", "stride_doh", "stride_dkt", "stride_dkh",
                                   "stride_dvt", "stride_dvh", "stride_dqt", "stride_dqh", "total_q"]}
        types = dict(ints, Q=p, K=p, V=p, O=p, DO=p, DQ=p, DK=p, DV=p, LSE="*fp32", DELTA="*fp32", CU_Q="*i32",
                     CU_K="*i32", TILE_SEG="*i32", TILE_BLK="*i32", qk_scale="fp32", sm_scale="fp32")
        warps = va.FWD_NUM_WARPS_HD128 if hd > 64 else va.FWD_NUM_WARPS_SMALL
        cases.append((va._attn_fwd_kernel, types, dict(common, NUM_HEADS=28, BLOCK_M=fwd_m, BLOCK_N=va.FWD_BLOCK_N),
                      warps, va.FWD_NUM_STAGES))
        bwd = dict(common, BLOCK_M=va.BWD_BLOCK_M, BLOCK_N=va.BWD_BLOCK_N)
        cases.append((va._attn_bwd_dkdv_kernel, types, dict(bwd, NUM_KV_HEADS=4), va.BWD_NUM_WARPS,
                      va.BWD_NUM_STAGES))
        cases.append((va._attn_bwd_dq_kernel, types, dict(bwd, NUM_HEADS=28), va.BWD_NUM_WARPS, va.BWD_NUM_STAGES))
    cases.append((va._attn_bwd_delta_kernel, dict(O="*bf16", DO="*bf16", DELTA="*fp32", stride_ot="i32",
                                                  stride_oh="i32", stride_dot="i32", stride_doh="i32", total_q="i32"),
                  dict(HEAD_DIM=80, BLOCK_T=va.DELTA_BLOCK_T, BLOCK_D=128), 4, 1))
    return cases


def _other_cases():
    rope = importlib.import_module("mllm_mega.kernels.rope")
    rms = importlib.import_module("mllm_mega.kernels.rmsnorm")
    ce = importlib.import_module("mllm_mega.kernels.cross_entropy")
    cases = []
    for dtype, half, sections, sign in [("bf16", 64, 3, 1.0), ("fp32", 40, 2, -1.0)]:
        types = dict(X="*" + dtype, Y="*" + dtype, POS="*i64", INV_FREQ="*fp32", SEC_ID="*i32", stride_xt="i32",
                     stride_xh="i32", stride_yt="i32", stride_yh="i32", stride_pc="i32", stride_pt="i32",
                     num_tokens="i32", num_heads="i32")
        cases.append((rope._rope_kernel, types, dict(HALF=half, BLOCK_HALF=64, NUM_SECTIONS=sections, SIGN=sign,
                                                     BLOCK_T=rope.BLOCK_T, BLOCK_H=rope.BLOCK_H), rope.NUM_WARPS, 3))
    rms_types = dict(X="*bf16", W="*bf16", Y="*bf16", DY="*bf16", DX="*bf16", RSTD="*fp32", DW_PARTIAL="*fp32",
                     stride_x="i32", stride_y="i32", stride_dy="i32", stride_dx="i32", num_rows="i32",
                     num_cols="i32", rows_per_program="i32", eps="fp32")
    cases.append((rms._rms_norm_fwd_kernel, rms_types, dict(BLOCK_N=4096), rms._num_warps(4096), 3))
    cases.append((rms._rms_norm_bwd_kernel, rms_types, dict(BLOCK_N=4096), rms._num_warps(4096), 3))
    ce_types = dict(LOGITS="*bf16", DLOGITS="*bf16", LABELS="*i64", WEIGHTS="*fp32", LSE="*fp32", GRAD_OUT="*fp32",
                    ROW_MAX="*fp32", ROW_SUMEXP="*fp32", ROW_TARGET="*fp32", stride_row="i32", stride_drow="i32",
                    vocab_local="i32", vocab_start="i32", ignore_index="i32")
    cases.append((ce._ce_fwd_kernel, ce_types, dict(BLOCK_V=ce.BLOCK_V), ce.NUM_WARPS, 3))
    cases.append((ce._ce_bwd_kernel, ce_types, dict(BLOCK_V=ce.BLOCK_V), ce.NUM_WARPS, 3))
    return cases


def _main():
    va = importlib.import_module("mllm_mega.kernels.varlen_attention")
    for fn, types, constexprs, warps, stages in _attention_cases(va) + _other_cases():
        start = time.time()
        kernel = _compile(fn, types, constexprs, warps, stages)
        print(f"ok {fn.__name__} {constexprs} smem={kernel.metadata.shared} {time.time() - start:.1f}s", flush=True)


def _triton_has_nvidia_backend():
    try:
        from triton.backends import backends
        return "nvidia" in backends
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _triton_has_nvidia_backend(), reason="triton without its NVIDIA backend")
def test_all_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    expected = len(_attention_cases(importlib.import_module("mllm_mega.kernels.varlen_attention")) + _other_cases())
    assert proc.stdout.count("\nok ") + proc.stdout.startswith("ok ") == expected, proc.stdout


if __name__ == "__main__":
    _main()
