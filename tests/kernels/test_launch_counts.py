"""The launch counters count each launcher once per call, forward and backward apart."""
import torch

from mllm_mega.kernels import KERNEL_NAMES, apply_rope, counting_launches, launch_counts, rms_norm


def test_counts_per_launcher():
    x = torch.randn(3, 2, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    pos = torch.arange(3)[None]
    inv_freq = torch.ones(4)
    before = launch_counts()
    with counting_launches() as counts:
        rms_norm(x, w, 1e-6).sum().backward()
        apply_rope(x, pos, inv_freq, (4,)).sum().backward()
        apply_rope(x.detach(), pos, inv_freq, (4,))  # no grad: forward only
    assert counts == {**dict.fromkeys(KERNEL_NAMES, 0), "rms_norm_fwd": 1, "rms_norm_bwd": 1, "rope_fwd": 2,
                      "rope_bwd": 1}
    assert launch_counts() == {k: before[k] + counts[k] for k in KERNEL_NAMES}
