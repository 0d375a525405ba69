"""Whole-model (TP=1, PP=1) access to mllm_mega checkpoints, shared by export, merge and graft.

A checkpoint is named by its root (``ROOT/mllm_mega.json`` + ``ROOT/iter_XXXXXXX`` + tracker, see
:mod:`mllm_mega.training.checkpointing`) or by one of its ``iter_XXXXXXX`` directories. Whatever TP/PP it was
saved at, :func:`load_full_state` builds the model at TP=1/PP=1 in this process and lets megatron's dist
checkpointing reshard on load, so every tool works on full tensors in our naming. Only the ``model`` part is
read: training checkpoints (optimizer, scheduler, RNG, data state) load the same way.

Outputs are written under a temporary name next to the destination and renamed when complete
(:func:`staged_output`), so a failed tool leaves nothing at ``--out``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from mllm_mega.models import registry
from mllm_mega.models.layout import ParallelLayout
from mllm_mega.training import checkpointing as ckpt

HF_EXTRA = "hf_extra"


@dataclass
class CheckpointRef:
    """A validated checkpoint: its root (meta, hf_extra), the iteration directory to load, and its meta."""

    root: str
    iter_path: str
    iteration: int
    meta: dict
    arch: object  # the family's parsed architecture (registry.arch_from_hf_config)


def resolve_checkpoint(path: str, flag: str = "--load") -> CheckpointRef:
    """Validate ``path`` (a checkpoint root or one of its iter dirs) without loading any weights.

    Raises FileNotFoundError / ValueError with a message naming ``flag`` and the path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a directory")
    base = os.path.basename(os.path.normpath(path))
    if base.startswith("iter_") and base[len("iter_"):].isdigit():
        root, iteration, iter_path = os.path.dirname(os.path.normpath(path)), int(base[len("iter_"):]), path
    else:
        root = path
        if not os.path.isfile(os.path.join(root, ckpt.META)):
            hint = (" (it looks like a HF model directory: import it with `tools/convert_checkpoint.py import-hf`)"
                    if os.path.isfile(os.path.join(root, "config.json")) else "")
            raise FileNotFoundError(f"{flag} {path!r} is not an mllm_mega checkpoint (no {ckpt.META}){hint}")
        iteration = ckpt.latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"{flag} {path!r} has no complete checkpoint (no {ckpt.TRACKER})")
        iter_path = ckpt.iter_dir(root, iteration)
    if not os.path.isfile(os.path.join(root, ckpt.META)):
        raise FileNotFoundError(f"{flag} {path!r}: no {ckpt.META} in {root!r}")
    if not os.path.isfile(os.path.join(iter_path, "metadata.json")):
        raise FileNotFoundError(f"{flag} {path!r}: {iter_path!r} is not a megatron dist checkpoint "
                                "(no metadata.json)")
    meta = ckpt.read_meta(root)
    if not isinstance(meta.get("hf_config"), dict):
        raise ValueError(f"{flag} {path!r}: {ckpt.META} has no 'hf_config' object")
    try:
        arch = registry.arch_from_hf_config(meta["hf_config"])
    except ValueError as e:
        raise ValueError(f"{flag} {path!r}: {e}") from None
    return CheckpointRef(root=root, iter_path=iter_path, iteration=iteration, meta=meta, arch=arch)


def build_full_model(arch):
    """The whole model at TP=1/PP=1 in this process (fp32, torch kernels)."""
    from mllm_mega.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1)
    return registry.spec_of(arch).build_stage(arch, ParallelLayout(), kernels="torch").eval()


def load_full_model(ref: CheckpointRef):
    model = build_full_model(ref.arch)
    ckpt.load_model_weights(ref.iter_path, model)
    return model


def tensor_state(model) -> dict[str, torch.Tensor]:
    """The model's parameters (our full names) as detached tensors; megatron's ``_extra_state`` dropped."""
    return {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def load_full_state(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    return tensor_state(load_full_model(ref))


def check_out(out: str, flag: str = "--out") -> None:
    """``out`` must not exist, or be an empty directory."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{flag} {out!r} exists and is not an empty directory")


@contextlib.contextmanager
def staged_output(out: str, prefix: str) -> Iterator[str]:
    """Yield a temporary directory next to ``out``; rename it to ``out`` on success, delete it on error."""
    check_out(out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_hf_extra(src_root: str, dst_root: str, names: list[str] | None = None) -> list[str]:
    """Copy tokenizer/processor files from ``src_root/hf_extra`` (all of them, or only ``names``)."""
    src = os.path.join(src_root, HF_EXTRA)
    if not os.path.isdir(src):
        return []
    copied = []
    for name in sorted(os.listdir(src)):
        if (names is None or name in names) and os.path.isfile(os.path.join(src, name)):
            os.makedirs(os.path.join(dst_root, HF_EXTRA), exist_ok=True)
            shutil.copy2(os.path.join(src, name), os.path.join(dst_root, HF_EXTRA, name))
            copied.append(name)
    return copied


def save_full_state(root: str, meta: dict, state: dict[str, torch.Tensor], *, iteration: int = 0) -> None:
    """Write ``state`` (full tensors, our names) as a model-only checkpoint at ``root`` (TP=1/PP=1)."""
    arch = registry.arch_from_hf_config(meta["hf_config"])
    model = build_full_model(arch)
    expected = tensor_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state does not match the architecture: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}")
    with torch.no_grad():
        for k, dst in expected.items():
            if tuple(dst.shape) != tuple(state[k].shape):
                raise ValueError(f"tensor {k}: shape {tuple(state[k].shape)}, architecture needs "
                                 f"{tuple(dst.shape)}")
            dst.copy_(state[k])
    ckpt.write_meta(root, copy.deepcopy(meta))
    ckpt.save_checkpoint(root, iteration, ckpt.model_sharded_state_dict(model))


def parse_dtype(name: str) -> torch.dtype:
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}
    name = names.get(name, name.replace("torch.", ""))
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {name!r} not supported; expected bf16, fp16 or fp32")
    return getattr(torch, name)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
