"""Fixtures for the training tests: one small synthetic dataset and a helper that runs the trainer."""
import json
import os
import types

import pytest
import yaml

from tests.conftest import run_cmd


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small synthetic shapes dataset (train shards, eval captions, tokenizer)."""
    from mllm_mega.data.synthetic import make_dataset

    out = str(tmp_path_factory.mktemp("data") / "shapes")
    make_dataset(out, 400, 0, num_eval=4, samples_per_shard=100, progress=False)
    return out


def base_config(shapes: str, tmp: str, **sections) -> str:
    """Write a tiny run config (fp32, torch kernels, JPEG augmentation and packing on); returns its path."""
    cfg = {
        "model": {"arch": "tiny_qwen2_5_vl", "kernels": "torch"},
        "parallel": {"tp": 1, "pp": 1},
        "train": {"max_steps": 6, "global_batch_size": 2, "micro_batch_size": 1, "eval_num_captions": 0},
        "optimizer": {"lr": 1.0e-3, "warmup_steps": 2, "weight_decay": 0.01},
        "checkpoint": {"save_interval": 100},
        "logging": {"tensorboard": False},
        "data": {"data_path": f"{shapes}/train", "tokenizer_dir": f"{shapes}/tokenizer", "seq_len": 512,
                 "buffer_size": 32, "jpeg_prob": 0.5, "prefetch": 1, "num_workers": 1},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = os.path.join(tmp, "run.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def train(config: str, *overrides: str, nproc: int = 1, env=None, timeout=600):
    return run_cmd(["-m", "mllm_mega.train", "--config", config, *overrides], nproc=nproc, env=env,
                   timeout=timeout)


def train_many(tmp: str, runs: dict, nproc: int = 1, env=None, timeout=900, tools: dict | None = None) -> dict:
    """Several trainer runs in ONE launch (tests/training/run_many.py: the start-up and imports are paid once).

    ``runs`` maps a name to ``(config, [overrides...])`` or ``(config, [overrides...], [(src, dst), ...])``
    (files copied when that run has ended); they run in this order (a later run may start from an
    earlier one's checkpoint). ``tools`` maps a run's name to a tool (``tools/X.py``) whose ``main`` that run
    calls with the same arguments instead of the trainer's. Returns name -> an object with ``returncode``, ``stdout`` and ``stderr`` of that
    run alone (all ranks' output, rank 0 first, as torchrun merges it), like ``train``'s result. A run the launch
    never finished has returncode None and the launch's own output."""
    spec, prefixes = [], {}
    for name, (config, overrides, *copies) in runs.items():
        prefixes[name] = os.path.join(tmp, f"log_{name}")
        spec.append({"argv": ["--config", config, *overrides], "log": prefixes[name],
                     "copy": [list(c) for c in (copies[0] if copies else [])], "tool": (tools or {}).get(name)})
    path = os.path.join(tmp, "runs.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    launch = run_cmd(["tests/training/run_many.py", path], nproc=nproc, env=env, timeout=timeout)
    out = {}
    for name, prefix in prefixes.items():
        rcs, stdout, stderr = [], "", ""
        for rank in range(nproc):
            if not os.path.isfile(f"{prefix}.rank{rank}.rc"):
                rcs = None
                break
            rcs.append(int(open(f"{prefix}.rank{rank}.rc").read()))
            stdout += open(f"{prefix}.rank{rank}.out").read()
            stderr += open(f"{prefix}.rank{rank}.err").read()
        if rcs is None:
            out[name] = types.SimpleNamespace(returncode=None, stdout=launch.stdout,
                                              stderr=f"launch exited {launch.returncode}:\n{launch.stderr}")
        else:
            out[name] = types.SimpleNamespace(returncode=next((c for c in rcs if c), 0), stdout=stdout,
                                              stderr=stderr)
    return out


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_ok(res):
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
