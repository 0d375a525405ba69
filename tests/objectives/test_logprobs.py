"""Per-token and per-segment log-probs against a brute-force log_softmax loop over each packed segment."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernel runs under the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from mllm_mega.objectives.logprobs import segment_logps, token_logps  # noqa: E402

IGNORE = -100


def _brute_force(logits, labels, cu):
    """One segment at a time: log_softmax over the full vocabulary, gather the label, sum the supervised ones."""
    sums = []
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        total = torch.zeros((), dtype=torch.float32)
        for t in range(a, b):
            if int(labels[t]) != IGNORE:
                total = total + torch.log_softmax(logits[t].float(), dim=0)[labels[t]]
        sums.append(total)
    return torch.stack(sums)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_segment_logps_match_brute_force(kernels):
    torch.manual_seed(0)
    cu = torch.tensor([0, 9, 9, 20, 21, 33], dtype=torch.int32)  # an empty segment and a 1-token segment
    labels = torch.randint(0, 41, (33,))
    labels[:4] = IGNORE          # prompt tokens
    labels[12:20] = IGNORE       # segment 2 keeps 3 supervised labels
    labels[20] = IGNORE          # segment 3 has none: sums to 0
    logits = (3 * torch.randn(33, 41)).requires_grad_()
    got = segment_logps(logits, labels, cu, kernels=kernels)
    expected = _brute_force(logits, labels, cu)
    assert got.dtype == torch.float32 and got.shape == (5,)
    # fp32 sums of <= 8 log-probs O(5): a few ulps of the sums
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)
    assert got[1] == 0 and got[3] == 0
    upstream = torch.tensor([0.3, -1.0, 2.0, 5.0, -0.7])  # a different gradient per segment
    (grad,) = torch.autograd.grad(got, logits, upstream)
    (grad_ref,) = torch.autograd.grad(expected, logits, upstream)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-5)
    per_token = token_logps(logits.detach(), labels, kernels=kernels)
    assert torch.all(per_token[labels == IGNORE] == 0) and torch.all(per_token <= 0)


def test_logps_errors():
    logits = torch.randn(6, 5)
    with pytest.raises(ValueError, match="token_logps"):
        token_logps(logits, torch.zeros(5, dtype=torch.long), kernels="torch")
    with pytest.raises(ValueError, match="cu_seqlens"):
        segment_logps(logits, torch.zeros(6, dtype=torch.long), torch.tensor([0, 4]), kernels="torch")
    with pytest.raises(ValueError, match="non-decreasing"):
        segment_logps(logits, torch.zeros(6, dtype=torch.long), torch.tensor([0, 4, 2, 6]), kernels="torch")
