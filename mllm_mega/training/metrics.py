"""Training log: a console line per log interval, metrics.jsonl (one JSON object per iteration), TensorBoard.

Throughput is honest: tokens/s/GPU counts only real (unpadded) tokens and TFLOP/s/GPU counts the ViT, merger
and LLM FLOPs of those tokens and images (training/flops.py). Peak memory is CUDA's max allocated on GPU and
the process's peak resident set on CPU.
"""
from __future__ import annotations

import json
import os
import resource
import time
import uuid

import torch


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _init_wandb(run_dir: str, settings: dict, config: dict | None):
    """A W&B run (resumed when run_dir already has one), or None when wandb is not installed."""
    try:
        import wandb
    except ImportError:
        print("[train] logging.wandb_project is set but wandb is not installed (pip install wandb): "
              "no W&B logging (metrics.jsonl is written)")
        return None
    id_path = os.path.join(run_dir, "wandb_run_id.txt")
    run_id = open(id_path).read().strip() if os.path.isfile(id_path) else uuid.uuid4().hex[:12]
    run = wandb.init(project=settings["project"], entity=settings.get("entity"),
                     name=settings.get("name") or os.path.basename(os.path.normpath(run_dir)), id=run_id,
                     resume="allow", dir=run_dir, config=config, mode=settings.get("mode"))
    if not os.path.isfile(id_path):
        tmp = f"{id_path}.tmp"
        with open(tmp, "w") as f:
            f.write(run_id)
        os.replace(tmp, id_path)
    return run


def _scalars(record: dict):
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration" and v == v}


class MetricsLogger:
    """Rank 0 only: writes run_dir/metrics.jsonl, TensorBoard events and (optionally) W&B; prints the console
    line. ``wandb`` = {"project", "entity", "name", "mode"} turns W&B on."""

    def __init__(self, run_dir: str, *, log_interval: int, tensorboard: bool, max_steps: int,
                 wandb: dict | None = None, config: dict | None = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.log_interval, self.max_steps = log_interval, max_steps
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("[train] tensorboard is not installed: no TensorBoard events (metrics.jsonl is written)")
        self.wandb = _init_wandb(run_dir, wandb, config) if wandb and wandb.get("project") else None
        self._step_times: list[float] = []
        self._file = open(self.path, "a")

    def log(self, record: dict) -> None:
        it = record["iteration"]
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and value == value:
                    self.writer.add_scalar(f"train/{key}", value, it)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in _scalars(record).items()}, step=it)
        self._step_times.append(record["step_time_s"])
        if it % self.log_interval == 0 or it == self.max_steps:
            recent = self._step_times[-20:]
            eta = (self.max_steps - it) * sum(recent) / len(recent)
            mfu = f" mfu {record['mfu'] * 100:.1f}%" if record.get("mfu") is not None else ""
            pref = (f" | reward acc {record['rewards_accuracy']:.3f} margin {record['rewards_margin']:.4f} chosen "
                    f"{record['rewards_chosen']:.4f} rejected {record['rewards_rejected']:.4f} delta "
                    f"{record['bco_delta']:.4f} | pref {record['loss_preference']:.4f} qual "
                    f"{record['loss_quality']:.4f} gen {record['loss_generation']:.4f}"
                    if "rewards_accuracy" in record else "")  # the preference objective's metrics
            skips = ",".join(f"{k}={v}" for k, v in sorted(record.get("skipped_samples", {}).items())) or "0"
            print(
                f"[train] iter {it}/{self.max_steps} | loss {record['loss']:.4f}{pref} | lr {record['lr']:.3e} | "
                f"grad_norm {record['grad_norm']:.3f} | tokens/s/gpu {record['tokens_per_s_per_gpu']:.0f} | "
                f"tflops/gpu {record['tflops_per_gpu']:.3f}{mfu} | peak_mem {record['peak_mem_gb']:.2f} GB | "
                f"nan_skipped_steps {record['nan_skipped_steps']} | skipped_samples {skips} | "
                f"eta {_fmt_time(eta)}",
                flush=True,
            )

    def close(self) -> None:
        self._file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - self.start
