"""Packed cross-entropy with per-sample loss reweighting, vocab-parallel aware, in Triton.

Loss reweighting as in InternVL2.5 (arXiv:2412.05271, "square averaging"): each token of packed sample s
gets weight 1 (token averaging), 1/n_s (sample averaging) or 1/sqrt(n_s) (square averaging), n_s being the
number of supervised labels of s. ``weighted_cross_entropy`` returns the *unnormalised* sum
sum_i w_i * ce_i; the trainer divides by the global sum of weights (across micro-batches and data-parallel
ranks), which is what makes the three modes exact under gradient accumulation.

Kernel design (after Liger-Kernel's cross-entropy): one program per token row streams the row's logits in
BLOCK_V chunks with an online max / sum-exp, so no fp32 copy of the logits is ever made; under tensor
parallelism each rank holds a vocab slice, and the per-row (max, sum-exp, target logit) are combined with
one MAX and one SUM all-reduce the way megatron's ``vocab_parallel_cross_entropy`` does. The backward
re-reads the logits once and writes d logits = g * w_i * (softmax - onehot) in the logits' dtype.

``cross_entropy_per_token`` is the unreduced form, ce_i (N,), for objectives that need per-token or per-sample
log-probs (DPO / MPO: log p = -ce): the same forward statistics and the same backward kernel, with the per-row
upstream gradient g_i in the weights slot and a unit scalar, so the reduced path's numbers are untouched.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._counts import count_launch

# ---- tuning constants ----------------------------------------------------------------------------
# Not yet tuned on a GPU. 8192-wide chunks (32 KiB of fp32 per program, 16 fp32 registers per thread
# with 16 warps) amortise the per-chunk reductions over long rows (152064 / 8192 = 19 chunks).
BLOCK_V = 8192
NUM_WARPS = 16

_MODES = ("token", "sample", "square")


# ---- reference (the specification) ------------------------------------------------------------------
def loss_weights(labels, cu_seqlens, mode, ignore_index=-100):
    """Per-token loss weights (N,) float32 for packed samples (plain torch, no host sync on GPU).

    labels (N,) already shifted (label i is the target of position i); cu_seqlens (S + 1,) sample
    boundaries with cu_seqlens[-1] == N. For sample s with n_s non-ignored labels: weight 1 ("token"),
    1 / n_s ("sample") or 1 / sqrt(n_s) ("square") on its non-ignored labels, 0 on ignored ones.
    """
    if mode not in _MODES:
        raise ValueError(f"loss_weights: mode must be one of {_MODES}, got {mode!r}")
    if labels.dim() != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("loss_weights: labels must be (N,) and cu_seqlens (num_samples + 1,)")
    if cu_seqlens.is_floating_point() or labels.is_floating_point():
        raise ValueError("loss_weights: labels and cu_seqlens must be integer tensors")
    if not labels.is_cuda and labels.numel() > 0 and int(cu_seqlens[-1]) != labels.numel():
        raise ValueError(f"loss_weights: cu_seqlens[-1] = {int(cu_seqlens[-1])} but labels has {labels.numel()}")
    valid = (labels != ignore_index).to(torch.float32)  # (N,)
    if mode == "token" or labels.numel() == 0:
        return valid
    cu = cu_seqlens.to(device=labels.device, dtype=torch.long)
    csum = torch.nn.functional.pad(torch.cumsum(valid, 0), (1, 0))  # (N + 1,)
    n_per_sample = csum[cu[1:]] - csum[cu[:-1]]  # (S,)
    sample_of = torch.searchsorted(cu[1:], torch.arange(labels.numel(), device=labels.device), right=True)
    n = n_per_sample[sample_of.clamp(max=max(n_per_sample.numel() - 1, 0))].clamp(min=1.0)
    per_token = 1.0 / n if mode == "sample" else torch.rsqrt(n)
    return valid * per_token


class _AllReduceSumSharedLoss(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity: the loss is replicated on every rank, so each rank's
    local logits receive exactly their partial derivative (megatron's vocab-parallel convention)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _tp_info(tp_group):
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def cross_entropy_per_token_ref(logits, labels, *, ignore_index=-100, tp_group=None):
    """ce_i = logsumexp(logits_i) - logits_i[labels_i] per row, 0 where labels_i == ignore_index; fp32 math.

    logits (N, V_local); with a tp_group of world size > 1, rank r holds vocab [r*V_local, (r+1)*V_local)
    and ce (N,) is the full-vocab value, replicated on every rank. Differentiable in logits; under TP each
    rank's slice receives its partial derivative of an upstream gradient that is itself replicated.
    """
    rank, world = _tp_info(tp_group)
    x = logits.float()
    valid = labels != ignore_index
    vocab_start = rank * x.shape[1]
    local = labels - vocab_start
    in_range = valid & (local >= 0) & (local < x.shape[1])
    target = torch.where(in_range, x.gather(1, local.clamp(0, max(x.shape[1] - 1, 0))[:, None]).squeeze(1),
                         torch.zeros_like(x[:, 0]))
    if world == 1:
        lse = torch.logsumexp(x, dim=1)
    else:  # logsumexp is shift-invariant, so the detached global max needs no gradient
        row_max = x.detach().amax(dim=1)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
        sum_exp = _AllReduceSumSharedLoss.apply(torch.exp(x - row_max[:, None]).sum(1), tp_group)
        lse = row_max + torch.log(sum_exp)
        target = _AllReduceSumSharedLoss.apply(target, tp_group)
    ce = lse - target
    return torch.where(valid, ce, torch.zeros_like(ce))


def weighted_cross_entropy_ref(logits, labels, weights, *, ignore_index=-100, tp_group=None):
    """sum_i weights_i * (logsumexp(logits_i) - logits_i[labels_i]) over labels_i != ignore_index; fp32 math.

    logits (N, V_local); with a tp_group of world size > 1, rank r holds vocab [r*V_local, (r+1)*V_local).
    Returns a 0-dim fp32 tensor, differentiable in logits.
    """
    ce = cross_entropy_per_token_ref(logits, labels, ignore_index=ignore_index, tp_group=tp_group)
    valid = labels != ignore_index
    return torch.where(valid, weights.float() * ce, torch.zeros_like(ce)).sum()


# ---- Triton kernels -------------------------------------------------------------------------------
@triton.jit
def _ce_fwd_kernel(LOGITS, LABELS, ROW_MAX, ROW_SUMEXP, ROW_TARGET, stride_row, vocab_local, vocab_start,
                   ignore_index, BLOCK_V: tl.constexpr):
    """Per row: m = max_v x_v, s = sum_v exp(x_v - m), t = x[label - vocab_start] if in this slice else 0.

    LOGITS (N, V_local) any float; LABELS (N,) int; outputs (N,) fp32. Ignored rows write (0, 1, 0).
    """
    row = tl.program_id(0)
    label = tl.load(LABELS + row).to(tl.int64)
    if label == ignore_index:
        tl.store(ROW_MAX + row, 0.0)
        tl.store(ROW_SUMEXP + row, 1.0)
        tl.store(ROW_TARGET + row, 0.0)
        return
    base = LOGITS + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    s = tl.zeros([1], dtype=tl.float32)
    for v0 in range(0, vocab_local, BLOCK_V):
        x = tl.load(base + v0 + offs, mask=v0 + offs < vocab_local, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    local = label - vocab_start
    in_range = (local >= 0) & (local < vocab_local)
    target = tl.load(base + tl.where(in_range, local, 0)).to(tl.float32)
    tl.store(ROW_MAX + row + tl.arange(0, 1), m)
    tl.store(ROW_SUMEXP + row + tl.arange(0, 1), s)
    tl.store(ROW_TARGET + row, tl.where(in_range, target, 0.0))


@triton.jit
def _ce_bwd_kernel(LOGITS, DLOGITS, LABELS, WEIGHTS, LSE, GRAD_OUT, stride_row, stride_drow, vocab_local,
                   vocab_start, ignore_index, BLOCK_V: tl.constexpr):
    """dlogits[i, v] = g * w_i * (exp(x_iv - lse_i) - [v == label_i - vocab_start]); 0 for ignored rows.

    g = GRAD_OUT (0-dim, read on device, no host sync); LSE (N,) fp32 global log-sum-exp.
    """
    row = tl.program_id(0)
    label = tl.load(LABELS + row).to(tl.int64)
    scale = tl.load(GRAD_OUT).to(tl.float32) * tl.load(WEIGHTS + row).to(tl.float32)
    scale = tl.where(label == ignore_index, 0.0, scale)
    offs = tl.arange(0, BLOCK_V)
    dbase = DLOGITS + row.to(tl.int64) * stride_drow
    if scale == 0.0:  # nothing to read: write the zero row
        for v0 in range(0, vocab_local, BLOCK_V):
            tl.store(dbase + v0 + offs, tl.zeros([BLOCK_V], dtype=DLOGITS.dtype.element_ty),
                     mask=v0 + offs < vocab_local)
        return
    base = LOGITS + row.to(tl.int64) * stride_row
    lse = tl.load(LSE + row)
    local = label - vocab_start
    for v0 in range(0, vocab_local, BLOCK_V):
        mask = v0 + offs < vocab_local
        x = tl.load(base + v0 + offs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(v0 + offs == local, 1.0, 0.0)
        tl.store(dbase + v0 + offs, (scale * grad).to(DLOGITS.dtype.element_ty), mask=mask)


# ---- launchers ------------------------------------------------------------------------------------
def _check_inputs(logits, labels, weights, name="weighted_cross_entropy"):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{name}: logits must be a float tensor (tokens, vocab), got "
                         f"{tuple(getattr(logits, 'shape', ()))} {getattr(logits, 'dtype', type(logits))}")
    if logits.stride(-1) != 1:
        raise ValueError(f"{name}: logits must have a contiguous last dim, strides {logits.stride()}")
    num_rows = logits.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (num_rows,) or labels.is_floating_point():
        raise ValueError(f"{name}: labels must be an integer tensor ({num_rows},), got "
                         f"{tuple(getattr(labels, 'shape', ()))} {getattr(labels, 'dtype', '')}")
    if weights is not None and (not isinstance(weights, torch.Tensor) or weights.shape != (num_rows,)
                                or not weights.is_floating_point()):
        raise ValueError(f"{name}: weights must be a float tensor ({num_rows},), got "
                         f"{tuple(getattr(weights, 'shape', ()))} {getattr(weights, 'dtype', '')}")
    for arg, t in (("labels", labels), ("weights", weights)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, logits on {logits.device}")
    if logits.shape[1] == 0:
        raise ValueError(f"{name}: logits has an empty vocab dimension")


def _block_v(vocab_local):
    return min(BLOCK_V, triton.next_power_of_2(vocab_local))


def _ce_stats(logits, labels, ignore_index, tp_group):
    """Returns (lse (N,) fp32 global log-sum-exp, target (N,) fp32 global target logit)."""
    rank, world = _tp_info(tp_group)
    num_rows, vocab_local = logits.shape
    stats = torch.empty((3, num_rows), dtype=torch.float32, device=logits.device)  # max, sum-exp, target
    if num_rows > 0:
        count_launch("cross_entropy_fwd")
        _ce_fwd_kernel[(num_rows,)](logits, labels, stats[0], stats[1], stats[2], logits.stride(0), vocab_local,
                                    rank * vocab_local, ignore_index, BLOCK_V=_block_v(vocab_local),
                                    num_warps=NUM_WARPS)
    row_max, sum_exp, target = stats[0], stats[1], stats[2]
    if world > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        combined = torch.stack([sum_exp * torch.exp(row_max - global_max), target])
        dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=tp_group)
        row_max, sum_exp, target = global_max, combined[0], combined[1]
    return row_max + torch.log(sum_exp), target


def _ce_forward(logits, labels, weights, ignore_index, tp_group):
    """Returns (loss 0-dim fp32, lse (N,) fp32)."""
    lse, target = _ce_stats(logits, labels, ignore_index, tp_group)
    valid = labels != ignore_index
    loss = torch.where(valid, weights.float() * (lse - target), torch.zeros_like(lse)).sum()
    return loss, lse


def _ce_backward(grad_out, logits, labels, weights, lse, ignore_index, tp_group):
    rank, _ = _tp_info(tp_group)
    num_rows, vocab_local = logits.shape
    dlogits = torch.empty_like(logits)
    if num_rows > 0:
        grad_out = grad_out.to(device=logits.device, dtype=torch.float32).contiguous()
        count_launch("cross_entropy_bwd")
        _ce_bwd_kernel[(num_rows,)](logits, dlogits, labels, weights, lse, grad_out, logits.stride(0),
                                    dlogits.stride(0), vocab_local, rank * vocab_local, ignore_index,
                                    BLOCK_V=_block_v(vocab_local), num_warps=NUM_WARPS)
    return dlogits


# ---- autograd ------------------------------------------------------------------------------------
class WeightedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index, tp_group):
        loss, lse = _ce_forward(logits, labels, weights, ignore_index, tp_group)
        ctx.save_for_backward(logits, labels, weights, lse)
        ctx.ignore_index, ctx.tp_group = ignore_index, tp_group
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, weights, lse = ctx.saved_tensors
        dlogits = _ce_backward(grad_out, logits, labels, weights, lse, ctx.ignore_index, ctx.tp_group)
        return dlogits, None, None, None, None


class CrossEntropyPerTokenFunction(torch.autograd.Function):
    """ce (N,) per row; the backward is the weighted kernel's with the per-row upstream gradient in the
    weights slot and a unit scalar (d logits_i = g_i * (softmax_i - onehot_i); 1.0 * g_i is exact)."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, tp_group):
        lse, target = _ce_stats(logits, labels, ignore_index, tp_group)
        ce = torch.where(labels != ignore_index, lse - target, torch.zeros_like(lse))
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.tp_group = ignore_index, tp_group
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        logits, labels, lse = ctx.saved_tensors
        unit = torch.ones((), dtype=torch.float32, device=logits.device)
        dlogits = _ce_backward(unit, logits, labels, grad_ce.float().contiguous(), lse, ctx.ignore_index,
                               ctx.tp_group)
        return dlogits, None, None, None


# ---- public API ----------------------------------------------------------------------------------
def weighted_cross_entropy(logits, labels, weights, *, ignore_index=-100, tp_group=None):
    """sum_i weights_i * ce_i over labels_i != ignore_index, a 0-dim fp32 tensor (not normalised).

    logits (N, V_local) in any float dtype (its vocab slice [r*V_local, (r+1)*V_local) on rank r of
    ``tp_group`` when that group has more than one rank); labels (N,) integer, global vocab ids;
    weights (N,) float (e.g. from ``loss_weights``). The gradient flows to logits only, in their dtype.
    Labels outside [0, V) other than ignore_index are not checked (target logit taken as 0, as megatron).
    """
    _check_inputs(logits, labels, weights)
    return WeightedCrossEntropyFunction.apply(logits, labels.contiguous(), weights.contiguous(), int(ignore_index),
                                              tp_group)


def cross_entropy_per_token(logits, labels, *, ignore_index=-100, tp_group=None):
    """ce_i = logsumexp(logits_i) - logits_i[labels_i] per row, (N,) fp32, 0 where labels_i == ignore_index.

    Same inputs and vocab-parallel convention as ``weighted_cross_entropy`` (the vocabulary is never
    gathered: one MAX and one SUM all-reduce of per-row statistics); ce is replicated over ``tp_group``.
    Differentiable in logits with a per-row upstream gradient. -ce_i is the token's log-probability.
    """
    _check_inputs(logits, labels, None, name="cross_entropy_per_token")
    return CrossEntropyPerTokenFunction.apply(logits, labels.contiguous(), int(ignore_index), tp_group)
