"""Launch counters: how many times each Triton kernel of this package was launched in this process.

A training run with ``kernels: triton`` must show launches of every kernel (the trainer logs them for its
first step), so a slot that silently falls back to a torch reference cannot go unnoticed. Incrementing a
dict entry per launch costs well under a microsecond next to a kernel launch (tens of microseconds).
"""
from __future__ import annotations

import contextlib

# One name per launcher; an op's backward counts once per call even when it launches several kernels.
KERNEL_NAMES = (
    "attention_fwd", "attention_bwd", "rope_fwd", "rope_bwd", "rms_norm_fwd", "rms_norm_bwd",
    "cross_entropy_fwd", "cross_entropy_bwd",
)
_COUNTS = dict.fromkeys(KERNEL_NAMES, 0)


def count_launch(name: str) -> None:
    _COUNTS[name] += 1  # KeyError on a misspelt name: every launcher uses one of KERNEL_NAMES


def launch_counts() -> dict[str, int]:
    """A copy of the counts since the process started (or the last reset), keyed by KERNEL_NAMES."""
    return dict(_COUNTS)


def reset_launch_counts() -> None:
    for name in _COUNTS:
        _COUNTS[name] = 0


@contextlib.contextmanager
def counting_launches():
    """``with counting_launches() as counts: ...``: after the block, ``counts`` holds its launches."""
    before = launch_counts()
    counts: dict[str, int] = {}
    try:
        yield counts
    finally:
        counts.update({name: n - before[name] for name, n in _COUNTS.items()})
