"""Reading HF model directories of any registered family (config.json + safetensors, single or sharded)."""
from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack

import torch

from mllm_mega.models import registry


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2, as in transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m or m.group(2) == "IB":
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2MiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be positive")
    return size


def read_donor_config(path: str, flag: str, model_types, what: str) -> dict:
    """config.json of a donor directory given as ``flag`` (compose tools), checked to be one of
    ``model_types`` (a name or a tuple of names); errors name the flag, the path and what was expected."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path!r} is not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{flag} {path!r} has no config.json (not a HF model directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag} {cfg_path}: not valid JSON ({e})") from None
    expected = (repr(model_types) if isinstance(model_types, str)
                else f"one of {list(model_types)}")
    if cfg.get("model_type") not in ((model_types,) if isinstance(model_types, str) else tuple(model_types)):
        raise ValueError(f"{flag} {path!r} is model_type {cfg.get('model_type')!r}, expected {expected} ({what})")
    return cfg


class HFCheckpointReader:
    """Lazy access to the tensors of a HF directory by on-disk name (e.g. ``visual.*``, ``model.*``,
    ``lm_head``; the family's ``normalize_hf_key`` maps in-memory names to those)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        if not os.path.isdir(hf_dir):
            raise FileNotFoundError(f"--hf-dir {hf_dir!r} is not a directory")
        self.hf_dir = hf_dir
        self.arch = registry.load_arch(hf_dir)
        self.spec = registry.spec_of(self.arch)
        normalize_hf_key = self.spec.normalize_hf_key
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            files, weight_map = ["model.safetensors"], None
        else:
            raise FileNotFoundError(f"{hf_dir!r}: neither model.safetensors nor model.safetensors.index.json")
        self._stack = ExitStack()
        self._handles = {}
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: listed in the index but missing")
            self._handles[name] = self._stack.enter_context(safe_open(path, framework="pt"))
        self._where = {}
        for name, h in self._handles.items():
            for k in h.keys():
                self._where[normalize_hf_key(k)] = (name, k)
        if weight_map is not None:
            for k, name in weight_map.items():
                if normalize_hf_key(k) not in self._where:
                    raise ValueError(f"{hf_dir}: tensor {k!r} is in the index ({name}) but not in that file")

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"{self.hf_dir}: missing tensor {key!r}")
        name, raw = self._where[key]
        return self._handles[name].get_tensor(raw)

    def dtype(self) -> torch.dtype:
        first = next(iter(self._where))
        return self.get(first).dtype

    def check_keys(self) -> None:
        """Every tensor the architecture needs is present and no unknown tensor is left over."""
        needed = {k for _, hf_keys, _ in self.spec.key_map(self.arch) for k in hf_keys}
        missing = sorted(needed - set(self._where))
        if missing:
            raise KeyError(f"{self.hf_dir}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        extra = sorted(set(self._where) - needed)
        if extra:
            raise ValueError(
                f"{self.hf_dir}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                "not used by this architecture (does config.json match the weights?)"
            )

    def close(self):
        self._stack.close()
