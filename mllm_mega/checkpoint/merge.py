"""Weight-space merging of checkpoints of one architecture (Valley2.5-style model soups).

Methods, applied tensor by tensor on the full (TP=1) weights, accumulated in float64:

* ``linear``: ``sum_i w_i * theta_i`` with the weights normalised to sum to 1 (default: equal weights), so
  ``--weights 2 1`` means 2/3 and 1/3.
* ``ties`` (TIES-merging, Yadav et al. 2023), with a base checkpoint ``theta_0``: task vectors
  ``tau_i = theta_i - theta_0``; *trim* each to its ``density`` fraction of largest magnitudes in that tensor
  (``k = ceil(density * numel)``, the rest set to 0); *elect* the sign of every element as the sign of
  ``sum_i trimmed tau_i``; *disjoint mean*: average, per element, the trimmed ``tau_i`` whose sign equals the
  elected one (0 where none do); result ``theta_0 + lambda * merged``.

Inputs must have the same architecture (the parsed config: shapes, heads, rope, special token ids, tying);
config keys that do not change the model (``transformers_version``, ``dtype``, ...) are not compared.
"""
from __future__ import annotations

import math
import os

import torch
from tqdm import tqdm

from mllm_mega.checkpoint.io import (
    CheckpointRef, check_out, copy_hf_extra, load_full_state, resolve_checkpoint, save_full_state, staged_output,
)

METHODS = ("linear", "ties")


# ---- the arithmetic ----------------------------------------------------------------------------------------
def linear_merge(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i * t_i`` (weights used as given) in float64, returned in the inputs' dtype."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for w, t in zip(weights, tensors):
        acc.add_(t.to(torch.float64), alpha=w)
    return acc.to(tensors[0].dtype)


def trim_top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * numel)`` largest-magnitude entries of ``tau``, zero the others."""
    k = min(tau.numel(), math.ceil(round(density * tau.numel(), 6)))  # round: 0.1 * 30 must give 3, not 4
    if k >= tau.numel():
        return tau.clone()
    flat = tau.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def ties_merge(base: torch.Tensor, tensors: list[torch.Tensor], *, density: float = 0.2,
               lam: float = 1.0) -> torch.Tensor:
    """TIES-merging of ``tensors`` against ``base`` (see the module docstring), in float64."""
    b = base.to(torch.float64)
    taus = torch.stack([trim_top_k(t.to(torch.float64) - b, density) for t in tensors])
    sign = torch.sign(taus.sum(dim=0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    count = agree.sum(dim=0)
    merged = torch.where(agree, taus, torch.zeros_like(taus)).sum(dim=0) / count.clamp(min=1)
    return (b + lam * merged).to(base.dtype)


# ---- architecture check -----------------------------------------------------------------------------------
def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_arch(refs: list[CheckpointRef]) -> None:
    """Raise ValueError naming the first architecture field on which a checkpoint differs from the first."""
    first = _flatten(refs[0].arch.to_dict())
    for ref in refs[1:]:
        other = _flatten(ref.arch.to_dict())
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"architectures differ: {key} is {first.get(key)!r} in {refs[0].root!r} but {other.get(key)!r} "
                    f"in {ref.root!r}; only checkpoints of the same architecture can be merged"
                )


def check_same_tensors(names: list[str], states: list[dict[str, torch.Tensor]]) -> None:
    ref = states[0]
    for name, st in zip(names[1:], states[1:]):
        for k in sorted(set(ref) | set(st)):
            if k not in st or k not in ref:
                raise ValueError(f"tensor {k} is in {names[0] if k in ref else name!r} but not in "
                                 f"{name if k in ref else names[0]!r}")
            if ref[k].shape != st[k].shape:
                raise ValueError(f"tensor {k}: shape {tuple(ref[k].shape)} in {names[0]!r} but "
                                 f"{tuple(st[k].shape)} in {name!r}")


# ---- the tool ---------------------------------------------------------------------------------------------
def merge_checkpoints(inputs: list[str], out: str, *, method: str = "linear", weights: list[float] | None = None,
                      base: str | None = None, density: float = 0.2, lam: float = 1.0,
                      progress: bool = True) -> dict:
    """Merge the checkpoints ``inputs`` into a new checkpoint ``out`` (iteration 0, model only, TP=1).

    Meta and hf_extra come from the first input (meta gains a ``merge`` record). Everything is validated
    before any weight is read; ``out`` appears only when complete. Returns the ``merge`` record.
    """
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if len(inputs) < 2:
        raise ValueError(f"--inputs: need at least 2 checkpoints, got {len(inputs)}")
    if method == "linear":
        if base is not None:
            raise ValueError("--base is only used by --method ties")
        weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
        if len(weights) != len(inputs):
            raise ValueError(f"--weights: {len(weights)} weight(s) for {len(inputs)} input(s)")
        if sum(weights) <= 0:
            raise ValueError(f"--weights {weights}: must sum to a positive number (they are normalised to 1)")
        weights = [w / sum(weights) for w in weights]
    else:
        if base is None:
            raise ValueError("--method ties needs --base (the checkpoint the task vectors are taken from)")
        if weights is not None:
            raise ValueError("--weights is only used by --method linear")
        if not 0 < density <= 1:
            raise ValueError(f"--density {density}: must be in (0, 1]")
    check_out(out)
    refs = [resolve_checkpoint(p, "--inputs") for p in inputs]
    base_ref = resolve_checkpoint(base, "--base") if base is not None else None
    check_same_arch(refs + ([base_ref] if base_ref else []))

    names = [r.root for r in refs] + ([base_ref.root] if base_ref else [])
    states = [load_full_state(r) for r in refs]
    base_state = load_full_state(base_ref) if base_ref else None
    check_same_tensors(names, states + ([base_state] if base_state else []))
    merged = {}
    for k in tqdm(sorted(states[0]), desc=f"merge ({method})", disable=not progress, unit="tensor"):
        ts = [s[k] for s in states]
        if method == "linear":
            merged[k] = linear_merge(ts, weights)
        else:
            merged[k] = ties_merge(base_state[k], ts, density=density, lam=lam)
    record = {"method": method, "inputs": [os.path.abspath(r.root) for r in refs]}
    if method == "linear":
        record["weights"] = weights
    else:
        record.update(base=os.path.abspath(base_ref.root), density=density, **{"lambda": lam})
    meta = {**refs[0].meta, "merge": record}
    with staged_output(out, ".merge-") as tmp:
        save_full_state(tmp, meta, merged)
        copy_hf_extra(refs[0].root, tmp)
    return record
