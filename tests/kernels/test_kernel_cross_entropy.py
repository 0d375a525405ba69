"""Packed reweighted cross-entropy: loss weights against a per-sample loop, the reference against torch's
cross_entropy, the Triton kernel (interpreter on CPU) against the reference, and the vocab-parallel path
on 2 gloo processes against the unsplit reference; the same for the unreduced per-token variant."""
import importlib
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mllm_mega.kernels import (cross_entropy_per_token, cross_entropy_per_token_ref, loss_weights,
                               weighted_cross_entropy, weighted_cross_entropy_ref)

ce_mod = importlib.import_module("mllm_mega.kernels.cross_entropy")
IGNORE = -100


def _labels(num_tokens, vocab, ignore_every=5):
    labels = torch.randint(0, vocab, (num_tokens,))
    labels[::ignore_every] = IGNORE
    return labels


# ---- loss weights -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_loss_weights_match_per_sample_loop(mode):
    labels = _labels(40, 50)
    labels[12:15] = IGNORE  # sample [12, 15) is fully ignored
    cu = torch.tensor([0, 12, 15, 15, 31, 40])  # includes an empty sample
    got = loss_weights(labels, cu, mode)
    expected = torch.zeros(40)
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        n = sum(1 for t in range(a, b) if labels[t] != IGNORE)
        for t in range(a, b):
            if labels[t] != IGNORE:
                expected[t] = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / math.sqrt(n)}[mode]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-6)


def test_loss_weights_sample_mode_gives_each_sample_weight_one():
    labels = _labels(30, 20)
    cu = torch.tensor([0, 7, 20, 30])
    w = loss_weights(labels, cu, "sample")
    for s in range(3):
        torch.testing.assert_close(w[cu[s]:cu[s + 1]].sum(), torch.tensor(1.0))


def test_loss_weights_errors():
    with pytest.raises(ValueError, match="mode"):
        loss_weights(torch.zeros(3, dtype=torch.long), torch.tensor([0, 3]), "mean")
    with pytest.raises(ValueError, match="cu_seqlens"):
        loss_weights(torch.zeros(3, dtype=torch.long), torch.tensor([0, 2]), "sample")


# ---- the reference against torch --------------------------------------------------------------------
def test_ref_matches_torch_cross_entropy():
    logits = (3 * torch.randn(23, 97)).requires_grad_()
    labels = _labels(23, 97)
    weights = torch.rand(23)
    ref = weighted_cross_entropy_ref(logits, labels, weights, ignore_index=IGNORE)
    expected = (F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none") * weights).sum()
    # fp32 both: logsumexp vs log_softmax summation order
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-6)
    g_ref, = torch.autograd.grad(ref, logits)
    g_exp, = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g_ref, g_exp, atol=1e-6, rtol=1e-5)


def test_token_mode_normalised_equals_mean_cross_entropy():
    logits, labels = torch.randn(31, 40), _labels(31, 40)
    w = loss_weights(labels, torch.tensor([0, 10, 31]), "token")
    loss = weighted_cross_entropy(logits, labels, w) / w.sum()
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=IGNORE), atol=1e-5, rtol=1e-5)


# ---- the kernel against the reference ---------------------------------------------------------------
# loss: fp32 accumulation on both sides over <= 37 rows -> 1e-5 relative. d logits are stored in the
# logits dtype: one final rounding, so one ulp relative (2^-8 bf16, 2^-11 fp16) around O(weight) values.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=2 ** -7),
       torch.float16: dict(atol=1e-4, rtol=2 ** -10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [300, 64, 7])  # ragged last chunk, exactly one chunk, tiny vocab
def test_kernel_matches_ref(monkeypatch, dtype, vocab):
    monkeypatch.setattr(ce_mod, "BLOCK_V", 64)  # several vocab chunks per row on tiny shapes
    labels = _labels(37, vocab)
    logits = (4 * torch.randn(37, vocab)).to(dtype).requires_grad_()
    weights = loss_weights(labels, torch.tensor([0, 10, 11, 30, 37]), "square")
    weights[3] = 0.0  # a supervised token with zero weight gets zero gradient
    loss = weighted_cross_entropy(logits, labels, weights, ignore_index=IGNORE)
    ref = weighted_cross_entropy_ref(logits, labels, weights, ignore_index=IGNORE)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss * 0.37, logits)  # upstream gradient != 1
    (grad_ref,) = torch.autograd.grad(ref * 0.37, logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    assert torch.all(grad[labels == IGNORE] == 0) and torch.all(grad[3] == 0)


def test_kernel_all_ignored_and_errors():
    logits = torch.randn(4, 10, requires_grad=True)
    labels = torch.full((4,), IGNORE)
    loss = weighted_cross_entropy(logits, labels, torch.ones(4))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.all(grad == 0)
    with pytest.raises(ValueError, match="weights"):
        weighted_cross_entropy(logits, torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="labels"):
        weighted_cross_entropy(logits, torch.zeros(4), torch.ones(4))


# ---- the per-token (unreduced) variant ---------------------------------------------------------------
def test_per_token_ref_matches_torch_cross_entropy():
    logits = (3 * torch.randn(23, 97)).requires_grad_()
    labels = _labels(23, 97)
    ce = cross_entropy_per_token_ref(logits, labels, ignore_index=IGNORE)
    expected = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")
    # fp32 both: logsumexp vs log_softmax summation order, values O(5) -> a few ulps
    torch.testing.assert_close(ce, expected, atol=2e-6, rtol=1e-6)
    upstream = torch.randn(23)  # a different gradient per token, as a preference loss gives
    g_ref, = torch.autograd.grad(ce, logits, upstream)
    g_exp, = torch.autograd.grad(expected, logits, upstream)
    torch.testing.assert_close(g_ref, g_exp, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_rows,vocab", [(37, 300), (1, 64), (5, 7), (0, 9)])  # ragged chunk, one row, tiny, empty
def test_per_token_kernel_matches_ref(monkeypatch, num_rows, vocab):
    monkeypatch.setattr(ce_mod, "BLOCK_V", 64)  # several vocab chunks per row on tiny shapes
    labels = _labels(num_rows, vocab, ignore_every=4) if num_rows > 1 else torch.randint(0, vocab, (num_rows,))
    logits = (4 * torch.randn(num_rows, vocab)).requires_grad_()
    ce = cross_entropy_per_token(logits, labels, ignore_index=IGNORE)
    ref = cross_entropy_per_token_ref(logits, labels, ignore_index=IGNORE)
    assert ce.dtype == torch.float32 and ce.shape == (num_rows,)
    # fp32 online max / sum-exp vs torch.logsumexp on values O(10): a few ulps
    torch.testing.assert_close(ce, ref, atol=2e-6, rtol=1e-6)
    assert torch.all(ce[labels == IGNORE] == 0)
    upstream = torch.randn(num_rows)
    (grad,) = torch.autograd.grad(ce, logits, upstream)
    (grad_ref,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float32])
    assert torch.all(grad[labels == IGNORE] == 0)


def test_per_token_sum_is_the_weighted_loss_bit_for_bit():
    """The per-token path shares the weighted path's statistics: w . ce equals weighted_cross_entropy."""
    logits, labels, weights = 3 * torch.randn(29, 70), _labels(29, 70), torch.rand(29)
    for per_token, weighted in ((cross_entropy_per_token, weighted_cross_entropy),
                                (cross_entropy_per_token_ref, weighted_cross_entropy_ref)):
        ce = per_token(logits, labels, ignore_index=IGNORE)
        assert torch.equal(torch.where(labels != IGNORE, weights * ce, torch.zeros_like(ce)).sum(),
                           weighted(logits, labels, weights, ignore_index=IGNORE))


def test_per_token_errors():
    with pytest.raises(ValueError, match="cross_entropy_per_token: labels"):
        cross_entropy_per_token(torch.randn(4, 10), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cross_entropy_per_token: logits"):
        cross_entropy_per_token(torch.randn(4), torch.zeros(4, dtype=torch.long))


# ---- vocab-parallel (tensor-parallel) path on 2 gloo processes --------------------------------------
def _tp_worker(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ce = importlib.import_module("mllm_mega.kernels.cross_entropy")
        ce.BLOCK_V = 32
        torch.manual_seed(0)  # same full problem on every rank
        num_tokens, vocab = 19, 2 * 45
        full = (3 * torch.randn(num_tokens, vocab)).to(torch.float32)
        labels = _labels(num_tokens, vocab, ignore_every=4)
        weights = torch.rand(num_tokens)
        v_local = vocab // world
        group = dist.new_group(list(range(world)))
        results = {}
        for name, fn in (("kernel", ce.weighted_cross_entropy), ("ref", ce.weighted_cross_entropy_ref)):
            local = full[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
            loss = fn(local, labels, weights, ignore_index=IGNORE, tp_group=group)
            (grad,) = torch.autograd.grad(loss * 1.5, local)
            results[name] = (loss.detach(), grad)
        unsplit = full.clone().requires_grad_()
        loss_full = ce.weighted_cross_entropy_ref(unsplit, labels, weights, ignore_index=IGNORE)
        (grad_full,) = torch.autograd.grad(loss_full * 1.5, unsplit)
        # per-token variant: a per-token upstream gradient (replicated, as a loss over replicated ce gives)
        upstream = torch.randn(num_tokens)
        per_token = {}
        for name, fn in (("kernel", ce.cross_entropy_per_token), ("ref", ce.cross_entropy_per_token_ref)):
            local = full[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
            values = fn(local, labels, ignore_index=IGNORE, tp_group=group)
            (grad,) = torch.autograd.grad(values, local, upstream)
            per_token[name] = (values.detach(), grad)
        unsplit = full.clone().requires_grad_()
        values_full = torch.nn.functional.cross_entropy(unsplit, labels, ignore_index=IGNORE, reduction="none")
        (grad_values_full,) = torch.autograd.grad(values_full, unsplit, upstream)
        torch.save({"results": results, "loss_full": loss_full.detach(),
                    "grad_slice": grad_full[:, rank * v_local:(rank + 1) * v_local],
                    "per_token": per_token, "per_token_full": values_full.detach(),
                    "per_token_grad_slice": grad_values_full[:, rank * v_local:(rank + 1) * v_local]},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_two_ranks_match_unsplit_reference(tmp_path, monkeypatch):
    # CPU tensors in the workers, so their kernels run under the interpreter even on a GPU machine
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (loss, grad) in out["results"].items():
            # fp32 throughout; the split only changes summation order
            torch.testing.assert_close(loss, out["loss_full"], atol=1e-5, rtol=1e-6, msg=f"{name} loss r{rank}")
            torch.testing.assert_close(grad, out["grad_slice"], atol=1e-6, rtol=1e-5, msg=f"{name} grad r{rank}")
        for name, (values, grad) in out["per_token"].items():  # against torch's unsplit cross_entropy
            torch.testing.assert_close(values, out["per_token_full"], atol=2e-6, rtol=1e-6, msg=f"{name} ce r{rank}")
            torch.testing.assert_close(grad, out["per_token_grad_slice"], atol=1e-6, rtol=1e-5,
                                       msg=f"{name} per-token grad r{rank}")


# ---- GPU ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_full_vocab():
    num_tokens, vocab = 2048, 152064
    logits = torch.randn(num_tokens, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = _labels(num_tokens, vocab).cuda()
    weights = loss_weights(labels, torch.tensor([0, 100, 1000, 2048], device="cuda"), "square")
    loss = weighted_cross_entropy(logits, labels, weights)
    ref = weighted_cross_entropy_ref(logits, labels, weights)
    torch.testing.assert_close(loss, ref, atol=1e-3, rtol=1e-5)  # fp32 sums of 2048 terms, different order
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_bf16_full_vocab_per_token():
    num_tokens, vocab = 2048, 152064
    logits = torch.randn(num_tokens, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = _labels(num_tokens, vocab).cuda()
    ce = cross_entropy_per_token(logits, labels)
    ref = cross_entropy_per_token_ref(logits, labels)
    torch.testing.assert_close(ce, ref, atol=1e-4, rtol=1e-5)  # fp32 sums over 152064 terms, different order
    upstream = torch.randn(num_tokens, device="cuda")
    (grad,) = torch.autograd.grad(ce, logits, upstream)
    (grad_ref,) = torch.autograd.grad(ref, logits, upstream)
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.bfloat16])
