"""Megatron distributed checkpoints (torch_dist) with a crash-safe layout.

Layout of a checkpoint root::

    ROOT/iter_0000100/            one megatron dist checkpoint (model [, optimizer, scheduler, ...])
    ROOT/latest_checkpointed_iteration.txt   written LAST, atomically: a killed save never looks valid
    ROOT/mllm_mega.json           model description (HF config.json of the architecture, source dtype)

A save goes to ``iter_XXXXXXX.tmp`` and is renamed when every rank has finished, then the tracker is
updated; keep-last-k retention only ever deletes older iterations than the one the tracker names.
Loading at another TP/PP layout reshards the weights (megatron's sharded state dict).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
META = "mllm_mega.json"


def iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_iteration(root: str) -> int | None:
    """The iteration named by the tracker, or None when ROOT has no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        it = int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number, got {text!r}") from None
    if not os.path.isdir(iter_dir(root, it)):
        raise FileNotFoundError(f"{path} names iteration {it} but {iter_dir(root, it)} is missing")
    return it


def read_meta(root: str) -> dict:
    """The model description of a checkpoint ROOT (or of ROOT/iter_XXXXXXX: read from its parent)."""
    path = os.path.join(root, META)
    if not os.path.isfile(path) and os.path.basename(os.path.normpath(root)).startswith("iter_"):
        path = os.path.join(os.path.dirname(os.path.normpath(root)), META)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{root!r} is not an mllm_mega checkpoint (no {META}); create one with "
            "`tools/convert_checkpoint.py import-hf` or by training"
        )
    with open(path) as f:
        return json.load(f)


def write_meta(root: str, meta: dict) -> None:
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        atomic_write_text(os.path.join(root, META), json.dumps(meta, indent=2))


FAULT_ENV = "MLLM_MEGA_FAULT"  # test aid: "crash_in_save:N" kills the process mid-save of iteration N


def _maybe_crash_in_save(iteration: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"crash_in_save:{iteration}":
        import multiprocessing

        print(f"[fault injection] {FAULT_ENV}={fault}: killing the process during the save", flush=True)
        for child in multiprocessing.active_children():  # checkpoint writer processes would outlive us
            child.kill()
        os._exit(17)


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, *, keep_last: int | None = None,
                    write_extra=None, async_queue=None) -> str:
    """Collective: save ``sharded_state_dict`` as ROOT/iter_XXXXXXX, then update the tracker.

    ``write_extra(tmp_dir)`` runs on every rank after the sharded save (scheduled, when async) and before the rename (per-rank files
    such as RNG and data-loader states). With ``async_queue`` (megatron's AsyncCallsQueue, GPU) the tensors
    are written by a background process and the rename + tracker update run when it has finished on every
    rank (``finalize_async_saves``); until then the previous checkpoint stays the valid one.
    """
    from megatron.core import dist_checkpointing

    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()

    def finalize():
        _maybe_crash_in_save(iteration)
        if _rank() == 0:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(os.path.join(root, TRACKER), str(iteration))
            if keep_last:
                _apply_retention(root, iteration, keep_last)

    if async_queue is not None:
        request = dist_checkpointing.save(sharded_state_dict, tmp, async_sharded_save=True)
        request.add_finalize_fn(finalize)
        async_queue.schedule_async_request(request)
        if write_extra is not None:
            write_extra(tmp)
        return final
    dist_checkpointing.save(sharded_state_dict, tmp)
    if write_extra is not None:
        write_extra(tmp)
    _barrier()
    finalize()
    _barrier()
    return final


def finalize_async_saves(async_queue, *, blocking: bool) -> None:
    """Complete the async saves that every rank has finished (all of them when ``blocking``)."""
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=blocking, no_dist=False)


def _apply_retention(root: str, newest: int, keep_last: int) -> None:
    iters = sorted(
        int(d[len("iter_"):]) for d in os.listdir(root)
        if d.startswith("iter_") and d[len("iter_"):].isdigit()
    )
    complete = [i for i in iters if i <= newest]
    for it in complete[:-keep_last]:
        if it != newest:
            shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def load_checkpoint(path: str, sharded_state_dict: dict, *, strict: bool = True) -> dict:
    """Collective: load into ``sharded_state_dict`` from ROOT (its latest iteration) or an iter dir."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if os.path.isfile(os.path.join(path, TRACKER)):
        path = iter_dir(path, latest_iteration(path))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path!r} is not a megatron dist checkpoint (no metadata.json)")
    handling = StrictHandling.ASSUME_OK_UNEXPECTED if not strict else StrictHandling.RAISE_ALL
    return dist_checkpointing.load(sharded_state_dict, path, strict=handling)


def model_sharded_state_dict(model) -> dict:
    return {"model": model.sharded_state_dict(prefix="")}


def load_model_weights(path: str, model) -> None:
    """Load only the model weights (e.g. an HF-imported checkpoint or a previous training stage)."""
    state = load_checkpoint(path, model_sharded_state_dict(model), strict=False)
    model.load_state_dict(state["model"], strict=True)
