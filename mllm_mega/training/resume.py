"""What a relaunch checks before it continues a run: which checkpoint is good, whether the config still
describes the same run, and that the run directory holds no leftovers of a crash.

- ``select_resume_iteration``: the newest checkpoint that passes its manifest (integrity.py). A tracker naming
  a missing, incomplete or corrupted directory falls back to the newest intact one with a loud warning; the
  bad directories are moved aside (``iter_X.bad``), never deleted, and the tracker is pointed at the good one.
- ``check_config_change``: changes that break exact continuation are refused unless
  ``train.allow_config_change=true`` (then logged with the old and new values).
- ``remove_partial_saves`` / ``truncate_metrics``: no ``.tmp`` leftovers, no repeated metrics rows.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from mllm_mega.training import checkpointing as ckpt
from mllm_mega.training import integrity

# config keys whose change breaks the continuation of a run (data order, batch, RNG streams, model shape)
BREAKING_KEYS = ("seed", "train.global_batch_size", "data.data_path", "data.seed", "data.seq_len",
                 "data.loss_reweighting", "model.arch", "model.tiny_overrides", "model.arch_overrides",
                 "objective.name",
                 "objective.reference_from")
# what a config saved before a section existed meant
_SAVED_DEFAULTS = {"objective.name": "next_token", "objective.reference_from": None}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_problems(path: str) -> list[str]:
    """Collective: why the checkpoint directory PATH cannot be resumed from ([] = it can)."""
    if not os.path.isdir(path):
        return [f"{path}: missing"]
    if not os.path.isfile(os.path.join(path, integrity.MANIFEST)):
        # saved before manifests existed: accepted when its megatron metadata is there (warned by the caller)
        needed = [n for n in ("metadata.json", ".metadata") if not os.path.isfile(os.path.join(path, n))]
        return [f"{path}: incomplete (no {integrity.MANIFEST}, no {', '.join(needed)})"] if needed else []
    return integrity.verify(path)


def move_aside(path: str) -> str:
    """Rank 0: rename a bad checkpoint to PATH.bad (PATH.bad1, ...), out of the way of resume and retention."""
    target, n = path + ".bad", 0
    while os.path.exists(target):
        n += 1
        target = f"{path}.bad{n}"
    os.replace(path, target)
    return target


def select_resume_iteration(root: str, log=print) -> int | None:
    """Collective: the iteration to resume from (None: nothing to resume). Raises ValueError naming every
    problem when checkpoints exist but none is intact (nothing is moved then, so nothing is lost)."""
    tracked, tracker_problem = ckpt.read_tracker(root)
    iters = ckpt.complete_iterations(root)
    if tracked is None and not iters:
        if tracker_problem:
            raise ValueError(f"{tracker_problem}, and {root} holds no iter_* directory to resume from")
        return None
    warnings = [tracker_problem] if tracker_problem else []
    candidates = sorted((i for i in iters if tracked is None or i <= tracked), reverse=True)
    if tracked is not None and tracked not in iters:
        warnings.append(f"{os.path.join(root, ckpt.TRACKER)} names iteration {tracked} but "
                        f"{ckpt.iter_dir(root, tracked)} is missing")
    bad = []
    for it in candidates:
        path = ckpt.iter_dir(root, it)
        problems = checkpoint_problems(path)
        if not problems:
            break
        bad.append(path)
        warnings += problems
    else:
        raise ValueError(f"no intact checkpoint to resume from in {root}: " + "; ".join(warnings) +
                         ". Fix or remove them, or set checkpoint.resume=false to start over")
    if not os.path.isfile(os.path.join(path, integrity.MANIFEST)):
        log(f"[train] WARNING: {path} has no {integrity.MANIFEST} (saved by an older version): not verified")
    if warnings:
        moved = []
        if _rank() == 0:
            moved = [f"{p} -> {move_aside(p)}" for p in bad]
            ckpt.atomic_write_text(os.path.join(root, ckpt.TRACKER), str(it))
        _barrier()
        banner = "!" * 100
        log(f"{banner}\n[train] WARNING: checkpoint problems in {root}:\n  " + "\n  ".join(warnings) +
            f"\n[train] WARNING: falling back to {path} (iteration {it})" +
            (f"; moved aside (not deleted): {', '.join(moved)}" if moved else "") + f"\n{banner}")
    return it


def remove_partial_saves(run_dir: str, log=print) -> list[str]:
    """Rank 0, holding the run lock: remove what a killed run left half-written (``iter_X.tmp`` directories,
    ``*.tmp-<pid>`` files); nothing else can be writing them."""
    removed = []
    root = os.path.join(run_dir, "checkpoints")
    for d in (run_dir, root):
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if (name.startswith("iter_") and name.endswith(".tmp")) or ".tmp-" in name or name == "hf_extra.tmp":
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                removed.append(path)
    if removed:
        log(f"[train] removed partial files of an interrupted run: {', '.join(removed)}")
    return removed


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in BREAKING_KEYS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, new: dict) -> tuple[list[tuple], list[tuple]]:
    """(breaking, harmless) changes between two resolved configs, as (key, old, new) tuples."""
    a, b = {**_SAVED_DEFAULTS, **_flatten(saved)}, _flatten(new)
    changes = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    breaking = [c for c in changes if c[0] in BREAKING_KEYS]
    return breaking, [c for c in changes if c[0] not in BREAKING_KEYS]


def check_config_change(run_dir: str, new: dict, *, allow: bool, log=print) -> None:
    """Compare NEW (the resolved config of this launch) with RUN_DIR/config.yaml before resuming; raises
    ValueError (exit 2, config.yaml left as it was) on a change that breaks exact continuation."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
        if not isinstance(saved, dict):
            raise ValueError(f"expected a mapping, got {type(saved).__name__}")
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the saved config of the run being resumed ({e})") from None
    breaking, _ = config_changes(saved, new)
    if not breaking:
        return
    lines = [f"{k}: {old!r} -> {new_!r}" for k, old, new_ in breaking]
    if not allow:
        raise ValueError(f"resuming {run_dir} with a changed config that breaks exact continuation ("
                         + "; ".join(lines) + f"; saved config {path}). Use the saved values, a new run_dir, "
                         "or train.allow_config_change=true to continue anyway")
    log("[train] WARNING: train.allow_config_change=true: resuming with changed " + "; ".join(lines))


def truncate_metrics(run_dir: str, iteration: int) -> int:
    """Drop metrics.jsonl rows after ITERATION (logged after the checkpoint being resumed, so redone now);
    written to a temporary name and renamed. Returns the number of rows dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                it = json.loads(line)["iteration"]
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a line cut by the crash
                continue
            if it <= iteration:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        ckpt.atomic_write_text(path, "".join(kept))
    return dropped


def read_json(path: str, what: str):
    """A JSON file of a checkpoint, with errors that name it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} ({what}) is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} ({what}) is corrupt: {e}") from None


def read_torch(path: str, what: str):
    try:
        return torch.load(path, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} ({what}) is missing") from None
    except Exception as e:  # torch raises a mix (RuntimeError, EOFError, UnpicklingError) for a bad file
        raise ValueError(f"{path} ({what}) is corrupt: {type(e).__name__}: {e}") from None
