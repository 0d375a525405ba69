"""The loss slot gives the same value and logits gradient with kernels=triton (interpreter) and torch, and
the torch path equals an independent F.cross_entropy computation."""
import torch
import torch.nn.functional as F

from mllm_mega.kernels import loss_weights
from mllm_mega.training.loss import weighted_loss_sum


def test_loss_slot_triton_equals_torch_and_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 300, generator=g)
    labels = torch.randint(0, 300, (37,), generator=g)
    labels[[0, 5, 20, 36]] = -100
    cu = torch.tensor([0, 10, 11, 30, 37], dtype=torch.int32)
    weights = loss_weights(labels, cu, "square")
    results = {}
    for kernels in ("torch", "triton"):
        x = logits.clone().requires_grad_(True)
        loss = weighted_loss_sum(x, labels, weights, kernels=kernels)
        loss.backward()
        results[kernels] = (loss.detach(), x.grad)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    expected = (ce * weights).sum()
    # fp32: streaming log-sum-exp vs torch's differ by rounding only.
    torch.testing.assert_close(results["torch"][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["triton"][1], results["torch"][1], rtol=1e-5, atol=1e-6)
