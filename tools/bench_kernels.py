"""Benchmark mllm_mega's Triton kernels against the best alternatives available in the same run.

    python tools/bench_kernels.py --op {attention,rope,rmsnorm,ce,all} [--plot FILE.png] [--json]

Per workload it prints a markdown table: implementation, pass (fwd / fwd+bwd), ms (median, CUDA events),
TFLOP/s (attention: only the FLOPs of visible query-key pairs, so causal counts about half) and GB/s (the
bytes each pass must move at least: inputs read once, outputs written once), peak extra memory, and the
largest forward difference from the first baseline. Baselines: torch SDPA per segment (HF's path) and with
a block-diagonal mask, torch.nn.attention.varlen.varlen_attn and flash-attn when present, HF eager RoPE /
RMSNorm code, torch cross-entropy plus weighting.

Without CUDA the kernels run under TRITON_INTERPRET on tiny shapes: correctness-only, timings meaningless.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from mllm_mega.kernels import (apply_rope, loss_weights, rms_norm, varlen_attention,  # noqa: E402
                               weighted_cross_entropy)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # the interpreter's bf16 tl.dot is not trustworthy
CPU_BANNER = "CPU / TRITON_INTERPRET: correctness-only, timings meaningless"


# ---- timing ---------------------------------------------------------------------------------------
def measure(fn, warmup=3, iters=10):
    """(median ms, peak extra MiB). CUDA events on GPU; one wall-clock run under the interpreter."""
    if not CUDA:  # one call (cache building included): interpreted timings are meaningless anyway
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3, float("nan")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return statistics.median(s.elapsed_time(e) for s, e in events), peak


def run_impls(workload, impls, inputs, flops, bytes_moved, results):
    """impls: name -> forward fn(*inputs) or None (with the reason in a string). Times fwd and fwd+bwd."""
    reference = None
    grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for name, fn in impls.items():
        if isinstance(fn, str):
            results.append(dict(workload=workload["name"], impl=name, skipped=fn))
            continue
        try:
            with torch.no_grad():
                out = fn(*inputs)
            err = float("nan") if reference is None else (out.float() - reference.float()).abs().max().item()
            if reference is None:
                reference = out
            grad_out = torch.randn_like(out) if out.dim() > 0 else torch.ones_like(out)

            def fwd():
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd():
                torch.autograd.grad(fn(*inputs), grad_inputs, grad_out)

            for pass_name, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                ms, peak = measure(call)
                rec = dict(workload=workload["name"], shape=workload["shape"], impl=name, **{"pass": pass_name},
                           ms=ms, peak_mib=peak, err_vs_first=err)
                if flops is not None:
                    rec["tflops"] = flops[pass_name] / ms / 1e9
                rec["gbps"] = bytes_moved[pass_name] / ms / 1e6
                results.append(rec)
        except Exception as exc:  # a baseline that cannot run here is reported, not fatal
            results.append(dict(workload=workload["name"], impl=name, skipped=f"{type(exc).__name__}: {exc}"[:120]))


# ---- attention ------------------------------------------------------------------------------------
def mixed_lengths(total, seed, lo, hi):
    """Sample lengths log-uniform in [lo, hi], the last one trimmed so the pack is exactly `total`."""
    gen = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(1, generator=gen).item())))
    lens[-1] -= sum(lens) - total
    return [n for n in lens if n > 0]


def attention_workloads():
    if not CUDA:
        return [dict(name="llm_tiny_causal", lens=[1, 40, 23], heads=4, kv_heads=1, hd=64, causal=True),
                dict(name="vit_tiny_windows", lens=[64, 64, 16], heads=2, kv_heads=2, hd=80, causal=False)]
    return [
        dict(name="llm_4096_causal", lens=mixed_lengths(4096, 0, 64, 2048), heads=28, kv_heads=4, hd=128, causal=True),
        dict(name="llm_8192_causal", lens=mixed_lengths(8192, 1, 64, 4096), heads=28, kv_heads=4, hd=128, causal=True),
        # ViT window layers: 8x8-patch windows (64 tokens), partial windows at image borders
        dict(name="vit_windows_64", lens=[64] * 240 + [32, 48, 16, 8] * 4, heads=16, kv_heads=16, hd=80, causal=False),
        # ViT full-attention layers: one segment per image, up to 4096 patches
        dict(name="vit_images", lens=[4096, 2304, 1024, 1024, 576, 256, 64], heads=16, kv_heads=16, hd=80,
             causal=False),
    ]


def _sdpa_per_segment(q, k, v, cu, causal):
    out = []
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                           is_causal=causal, enable_gqa=True)
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def _sdpa_masked(q, k, v, mask):
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


def bench_attention(results):
    for wl in attention_workloads():
        lens, h, hkv, hd, causal = wl["lens"], wl["heads"], wl["kv_heads"], wl["hd"], wl["causal"]
        total = sum(lens)
        cu_list = [0] + torch.tensor(lens).cumsum(0).tolist()
        cu = torch.tensor(cu_list, dtype=torch.int32, device=DEVICE)
        max_len = max(lens)
        q = torch.randn(total, h, hd, device=DEVICE, dtype=DTYPE, requires_grad=True)
        k = torch.randn(total, hkv, hd, device=DEVICE, dtype=DTYPE, requires_grad=True)
        v = torch.randn(total, hkv, hd, device=DEVICE, dtype=DTYPE, requires_grad=True)
        wl["shape"] = (f"q ({total}, {h}, {hd}) kv ({total}, {hkv}, {hd}) {str(DTYPE)[6:]}, "
                       f"{'causal' if causal else 'non-causal'}, {len(lens)} segments (max {max_len})")
        pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)  # visible query-key pairs
        fwd_flops = 4 * pairs * h * hd  # QK^T and PV, 2 FLOPs per multiply-add
        elt = q.element_size()
        io_fwd = (q.numel() * 2 + k.numel() * 2) * elt  # read q, k, v, write o
        io_bwd = (q.numel() * 4 + k.numel() * 4) * elt  # read q, k, v, o, do; write dq, dk, dv
        flops = {"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops}  # backward = 2.5x forward (5 vs 2 matmuls)
        bytes_moved = {"fwd": io_fwd, "fwd+bwd": io_fwd + io_bwd}

        seg_ids = torch.repeat_interleave(torch.arange(len(lens), device=DEVICE), torch.tensor(lens, device=DEVICE))
        mask = seg_ids[:, None] == seg_ids[None, :]
        if causal:
            mask &= torch.ones(total, total, dtype=torch.bool, device=DEVICE).tril()
        impls = {
            "sdpa_per_segment (HF path)": lambda q, k, v: _sdpa_per_segment(q, k, v, cu_list, causal),
            "sdpa_block_diag_mask": lambda q, k, v: _sdpa_masked(q, k, v, mask),
        }
        try:
            from torch.nn.attention.varlen import varlen_attn
            if CUDA:
                impls["torch_varlen_attn"] = lambda q, k, v: varlen_attn(
                    q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0) if causal else (-1, -1),
                    enable_gqa=hkv != h)
            else:
                impls["torch_varlen_attn"] = "needs CUDA"
        except ImportError:
            impls["torch_varlen_attn"] = "not in this torch"
        try:
            from flash_attn import flash_attn_varlen_func
            impls["flash_attn_varlen"] = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len,
                                                                               causal=causal)
        except ImportError:
            impls["flash_attn_varlen"] = "flash-attn not installed"
        impls["mllm_mega varlen_attention"] = lambda q, k, v: varlen_attention(q, k, v, cu, cu, max_len, max_len,
                                                                               causal=causal)
        run_impls(wl, impls, (q, k, v), flops, bytes_moved, results)


# ---- RoPE -----------------------------------------------------------------------------------------
def bench_rope(results):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

    tokens = 8192 if CUDA else 64
    workloads = [  # (name, q heads, k heads, head_dim, sections, theta)
        ("llm_mrope_hd128", 28, 4, 128, (16, 24, 24), 1e6),
        ("vit_2d_rope_hd80", 16, 16, 80, (20, 20), 1e4),
    ] if CUDA else [("llm_mrope_tiny", 4, 1, 64, (8, 12, 12), 1e6), ("vit_2d_rope_tiny", 2, 2, 80, (20, 20), 1e4)]
    for name, hq, hk, hd, sections, theta in workloads:
        vit = len(sections) == 2
        q = torch.randn(tokens, hq, hd, device=DEVICE, dtype=DTYPE, requires_grad=True)
        k = torch.randn(tokens, hk, hd, device=DEVICE, dtype=DTYPE, requires_grad=True)
        pos = torch.randint(0, 64 if vit else 8192, (len(sections), tokens), device=DEVICE)
        if vit:
            f = 1.0 / (theta ** (torch.arange(0, hd // 2, 2, dtype=torch.float32, device=DEVICE) / (hd // 2)))
            inv_freq = torch.cat([f, f])
        else:
            inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=DEVICE) / hd))
        # HF precomputes cos/sin once per forward for all layers; its per-layer cost is the apply call
        sec_id = torch.repeat_interleave(torch.arange(len(sections), device=DEVICE),
                                         torch.tensor(sections, device=DEVICE))
        angles = pos[sec_id].t().float() * inv_freq
        emb = torch.cat([angles, angles], dim=-1)
        if vit:
            cos, sin = emb.cos(), emb.sin()
            hf_fn = lambda q, k: torch.cat(hf.apply_rotary_pos_emb_vision(q, k, cos, sin), dim=1)  # noqa: E731
        else:
            cos, sin = emb.cos().to(DTYPE)[None], emb.sin().to(DTYPE)[None]
            hf_fn = lambda q, k: torch.cat([t[0].transpose(0, 1) for t in hf.apply_rotary_pos_emb(  # noqa: E731
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)], dim=1)
        ours = lambda q, k: torch.cat([apply_rope(q, pos, inv_freq, sections),  # noqa: E731
                                       apply_rope(k, pos, inv_freq, sections)], dim=1)
        io = 2 * (q.numel() + k.numel()) * q.element_size()  # read and write q and k
        wl = dict(name=name, shape=f"q ({tokens}, {hq}, {hd}) k ({tokens}, {hk}, {hd}) {str(DTYPE)[6:]}, "
                                    f"sections {sections}")
        # note: the outputs are concatenated for the error column; the cat is in every implementation
        run_impls(wl, {"hf_apply_rotary (cos/sin precomputed)": hf_fn, "mllm_mega apply_rope": ours},
                  (q, k), None, {"fwd": io, "fwd+bwd": 2 * io}, results)


# ---- RMSNorm --------------------------------------------------------------------------------------
def bench_rmsnorm(results):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    shapes = [("llm_hidden_3584", 8192, 3584), ("vit_hidden_1280", 16384, 1280)] if CUDA else \
        [("tiny_256", 64, 256)]
    for name, rows, hidden in shapes:
        x = torch.randn(rows, hidden, device=DEVICE, dtype=DTYPE, requires_grad=True)
        hf_norm = Qwen2RMSNorm(hidden, eps=1e-6).to(device=DEVICE, dtype=DTYPE)
        w = hf_norm.weight
        io = 2 * x.numel() * x.element_size()  # read x, write y
        wl = dict(name=name, shape=f"x ({rows}, {hidden}) {str(DTYPE)[6:]}")
        impls = {"hf_Qwen2RMSNorm (eager)": lambda x, w: hf_norm(x),  # hf_norm.weight is w
                 "torch F.rms_norm": lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
                 "mllm_mega rms_norm": lambda x, w: rms_norm(x, w, 1e-6)}
        # fwd+bwd also reads x and dy and writes dx (dweight is tiny)
        run_impls(wl, impls, (x, w), None, {"fwd": io, "fwd+bwd": io + 3 * x.numel() * x.element_size()}, results)


# ---- cross-entropy --------------------------------------------------------------------------------
def bench_ce(results):
    tokens, vocab = (8192, 152064) if CUDA else (16, 512)
    logits = torch.randn(tokens, vocab, device=DEVICE, dtype=DTYPE, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=DEVICE)
    labels[::7] = -100
    cu = torch.tensor([0, tokens // 4, tokens // 2, tokens], device=DEVICE)
    weights = loss_weights(labels, cu, "square")

    def torch_ce(x):
        return (F.cross_entropy(x.float(), labels, ignore_index=-100, reduction="none") * weights).sum()

    io = logits.numel() * logits.element_size()
    wl = dict(name=f"ce_{tokens}x{vocab}", shape=f"logits ({tokens}, {vocab}) {str(DTYPE)[6:]}, square weights")
    impls = {"torch cross_entropy(fp32) * weights": torch_ce,
             "mllm_mega weighted_cross_entropy": lambda x: weighted_cross_entropy(x, labels, weights)}
    # fwd reads the logits once; fwd+bwd reads them twice more and writes d logits once
    run_impls(wl, impls, (logits,), None, {"fwd": io, "fwd+bwd": 3 * io}, results)


# ---- report ---------------------------------------------------------------------------------------
def _fmt(x, digits=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_tables(results):
    by_workload = {}
    for rec in results:
        by_workload.setdefault(rec["workload"], []).append(rec)
    for name, recs in by_workload.items():
        shape = next((r["shape"] for r in recs if "shape" in r), "")
        print(f"\n### {name}: {shape}\n")
        print("| implementation | pass | ms | TFLOP/s | GB/s | peak MiB | max fwd diff vs first |")
        print("|---|---|---|---|---|---|---|")
        for r in recs:
            if "skipped" in r:
                print(f"| {r['impl']} | - | skipped: {r['skipped']} | | | | |")
                continue
            print(f"| {r['impl']} | {r['pass']} | {_fmt(r['ms'], 3)} | {_fmt(r.get('tflops'), 1)} | "
                  f"{_fmt(r['gbps'], 1)} | {_fmt(r['peak_mib'], 0)} | {_fmt(r['err_vs_first'], 4)} |")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["workload"] for r in results if "skipped" not in r))
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        recs = [r for r in results if r["workload"] == name and "skipped" not in r]
        metric = "tflops" if "tflops" in recs[0] else "gbps"
        labels = [f"{r['impl']}\n{r['pass']}" for r in recs]
        ax.barh(range(len(recs)), [r[metric] for r in recs])
        ax.set_yticks(range(len(recs)), labels, fontsize=6)
        ax.set_xlabel("TFLOP/s" if metric == "tflops" else "GB/s")
        ax.set_title(name, fontsize=9)
    fig.suptitle(CPU_BANNER if not CUDA else torch.cuda.get_device_name(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--op", choices=["attention", "rope", "rmsnorm", "ce", "all"], default="all")
    parser.add_argument("--plot", metavar="FILE.png", help="write a bar chart per workload")
    parser.add_argument("--json", action="store_true", help="also print the records as one JSON line")
    args = parser.parse_args(argv)

    device = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    print(f"# mllm_mega kernel benchmark — {device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"# command: python tools/bench_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    if not CUDA:
        print(f"# {CPU_BANNER}")
    torch.manual_seed(0)
    results = []
    benches = {"attention": bench_attention, "rope": bench_rope, "rmsnorm": bench_rmsnorm, "ce": bench_ce}
    for op, bench in benches.items():
        if args.op in (op, "all"):
            bench(results)
    print_tables(results)
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot written to {args.plot}")
    if args.json:
        clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in results]
        print(json.dumps({"device": device, "cpu_interpreter": not CUDA, "records": clean}))
    return results


if __name__ == "__main__":
    main()
