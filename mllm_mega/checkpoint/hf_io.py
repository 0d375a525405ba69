"""Reading HF model directories of any registered family (config.json + safetensors, single or sharded)."""
from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch

from mllm_mega.models import registry


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
