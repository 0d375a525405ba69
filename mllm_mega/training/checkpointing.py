"""Megatron distributed checkpoints (torch_dist) with a crash-safe layout.

Layout of a checkpoint root::

    ROOT/iter_0000100/            one megatron dist checkpoint (model [, optimizer, scheduler, ...])
    ROOT/latest_checkpointed_iteration.txt   written LAST, atomically: a killed save never looks valid
    ROOT/mllm_mega.json           model description (HF config.json of the architecture, source dtype)

A save goes to ``iter_XXXXXXX.tmp``; when every rank has finished, the ranks hash their files into
``manifest.json`` (integrity.py), the directory is renamed, and only then the tracker is updated. Keep-last-k
retention only deletes iterations older than the one the tracker names, and keeps the newest checkpoint saved
before a run of NaN/Inf-skipped steps. A resume verifies the manifest and falls back to the newest intact
checkpoint (resume.py).
Loading at another TP/PP layout reshards the weights (megatron's sharded state dict).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time

import torch
import torch.distributed as dist

from mllm_mega.training import integrity

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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # e.g. a full disk: leave the old file, not a half-written temporary one
            os.remove(tmp)
        raise


def latest_iteration(root: str) -> int | None:
    """The iteration named by the tracker, or None when ROOT has no complete checkpoint."""
    it, problem = read_tracker(root)
    if problem:
        raise ValueError(problem)
    if it is not None and not os.path.isdir(iter_dir(root, it)):
        raise FileNotFoundError(f"{os.path.join(root, TRACKER)} names iteration {it} but {iter_dir(root, it)} "
                                "is missing")
    return it


def read_tracker(root: str) -> tuple[int | None, str | None]:
    """(iteration named by ROOT's tracker or None, a message naming the tracker when it is unreadable)."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii").strip()
        return int(text), None
    except (UnicodeDecodeError, ValueError):
        return None, f"{path}: corrupt tracker (expected an iteration number, got {open(path, 'rb').read(40)!r})"


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


last_save_stats = {"manifest_s": 0.0}  # this rank's time hashing files into the manifest at the last save


class CheckpointSaveError(RuntimeError):
    """A save that failed (disk full, I/O error); the partial directory is removed, the previous one kept."""


def _maybe_crash_in_save(iteration: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"crash_in_save:{iteration}":
        import multiprocessing

        print(f"[fault injection] {FAULT_ENV}={fault}: killing the process during the save", flush=True)
        for child in multiprocessing.active_children():  # checkpoint writer processes would outlive us
            child.kill()
        os._exit(17)


def _use_forked_results_queue() -> None:
    """megatron's torch_dist writer collects its workers' results through a ``multiprocessing`` Manager queue
    that it creates on the first save with the *spawn* start method: a fresh interpreter that re-imports the
    training script (torch, megatron, ...), ~5 s per rank at the first save of every run (measured on the
    2-core CI machine; 0.3-0.5 s for the later saves). A Manager started by fork is the same queue, ready at
    once; its server process only relays results (it never touches CUDA), and megatron forks its writer
    processes from this process anyway."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def save_checkpoint(root: str, iteration: int, sharded_state_dict: dict, *, keep_last: int | None = None,
                    write_extra=None, async_queue=None) -> str:
    """Collective: save ``sharded_state_dict`` as ROOT/iter_XXXXXXX, then update the tracker.

    ``write_extra(tmp_dir)`` runs on every rank after the sharded save (scheduled, when async) and before the
    rename (per-rank files such as RNG and data-loader states). Then every rank hashes its files into the
    manifest (integrity.py), rank 0 renames ``.tmp`` to the final name and only then moves the tracker. With
    ``async_queue`` (megatron's AsyncCallsQueue, GPU) the tensors are written by a background process and the
    manifest + rename + tracker run when it has finished on every rank (``finalize_async_saves``); until then
    the previous checkpoint stays the valid one. A failed write raises CheckpointSaveError (disk full named as
    such) after removing the partial directory.
    """
    from megatron.core import dist_checkpointing

    _use_forked_results_queue()
    final = iter_dir(root, iteration)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()

    def finalize():
        t = time.perf_counter()
        with _cleanup_on_failure(root, tmp, final):
            integrity.write_manifest(tmp, iteration=iteration)
        last_save_stats["manifest_s"] = time.perf_counter() - t
        _barrier()
        _maybe_crash_in_save(iteration)
        if _rank() == 0:
            publish(root, iteration, keep_last=keep_last)

    with _cleanup_on_failure(root, tmp, final):
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


def publish(root: str, iteration: int, *, keep_last: int | None = None) -> None:
    """Rank 0: make the complete ROOT/iter_X.tmp the checkpoint of ITERATION. The order is the crash safety:
    the tracker moves only after the rename, so it never names a directory that is not complete."""
    final = iter_dir(root, iteration)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(final + ".tmp", final)
    atomic_write_text(os.path.join(root, TRACKER), str(iteration))
    if keep_last:
        _apply_retention(root, iteration, keep_last)


class _cleanup_on_failure:
    """Remove the partial save on any error and re-raise it as CheckpointSaveError with a clear message."""

    def __init__(self, root: str, tmp: str, final: str):
        self.root, self.tmp, self.final = root, tmp, final

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        # torch's CheckpointException (what a failed shard write arrives as) derives from BaseException;
        # an interrupt is left alone (the next start removes the partial directory)
        if err is None or isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            return False
        free = _free_bytes(self.root)  # before the cleanup frees the partial files
        shutil.rmtree(self.tmp, ignore_errors=True)
        raise CheckpointSaveError(_describe_save_error(err, self.root, self.final, free)) from err


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _is_disk_full(err: BaseException, free: int | None, root: str) -> bool:
    e = err
    while e is not None:  # torch's writer reports a full disk as "unexpected pos ..." with no errno
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    if free is None:
        return False
    try:
        total = shutil.disk_usage(root).total
    except OSError:
        total = 0
    return free < max(_NEARLY_FULL, total // 200)


_NEARLY_FULL = 64 << 20  # a write that failed with less than this (or 0.5% of the disk) left: a full disk


def _describe_save_error(err: BaseException, root: str, final: str, free: int | None) -> str:
    prev = latest_good_hint(root)
    need = _dir_size(prev) if prev else None
    kept = f"the last good checkpoint {prev} is intact" if prev else "there is no earlier checkpoint"
    if _is_disk_full(err, free, root):
        mount = _mount_point(root)
        total = shutil.disk_usage(mount).total
        need_text = f"; a checkpoint needs about {_fmt_bytes(need)} (the size of {prev})" if need else ""
        return (f"disk full while saving {final}: the filesystem at {mount} has {_fmt_bytes(free or 0)} free of "
                f"{_fmt_bytes(total)}{need_text}. The partial {final}.tmp was removed and {kept}; free space or "
                "point run_dir at a larger disk, then run again to resume")
    return (f"saving {final} failed ({type(err).__name__}: {err}); the partial {final}.tmp was removed and "
            f"{kept}")


def latest_good_hint(root: str) -> str | None:
    it, _ = read_tracker(root)
    return iter_dir(root, it) if it is not None and os.path.isdir(iter_dir(root, it)) else None


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(b, n)) for b, _, names in os.walk(path) for n in names)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def finalize_async_saves(async_queue, *, blocking: bool) -> None:
    """Complete the async saves that every rank has finished (all of them when ``blocking``)."""
    if async_queue is not None:
        async_queue.maybe_finalize_async_calls(blocking=blocking, no_dist=False)


def complete_iterations(root: str) -> list[int]:
    """Iterations with a (renamed, so complete when saved) directory in ROOT, ascending."""
    if not os.path.isdir(root):
        return []
    return sorted(int(d[len("iter_"):]) for d in os.listdir(root)
                  if d.startswith("iter_") and d[len("iter_"):].isdigit())


def _saved_after_good_step(path: str) -> bool:
    """Whether a checkpoint was saved after a step that updated the weights (not inside a NaN-skipped run)."""
    try:
        with open(os.path.join(path, "extra", "train_state.json")) as f:
            return int(json.load(f).get("nan_in_a_row", 0)) == 0
    except (OSError, ValueError, AttributeError):
        return True  # a model-only checkpoint (import, reshard) or unreadable: no NaN information to act on


def _apply_retention(root: str, newest: int, keep_last: int) -> None:
    """Keep the newest KEEP_LAST checkpoints up to NEWEST, and the newest one saved before a run of NaN/Inf-
    skipped steps (checkpoints saved during such a run hold the same weights but mark a run going bad)."""
    complete = [i for i in complete_iterations(root) if i <= newest]
    protected = {newest}
    for it in reversed(complete):
        if _saved_after_good_step(iter_dir(root, it)):
            protected.add(it)
            break
    for it in complete[:-keep_last]:
        if it not in protected:
            shutil.rmtree(iter_dir(root, it), ignore_errors=True)


def load_checkpoint(path: str, sharded_state_dict: dict, *, strict: bool = True, verify: bool = True) -> dict:
    """Collective: load into ``sharded_state_dict`` from ROOT (its latest iteration) or an iter dir, after
    checking its files against the manifest (``verify``; a checkpoint saved before manifests existed loads
    unchecked). Raises ChecksumError naming every bad file."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} not found")
    if os.path.isfile(os.path.join(path, TRACKER)):
        path = iter_dir(path, latest_iteration(path))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path!r} is not a megatron dist checkpoint (no metadata.json)")
    if verify and os.path.isfile(os.path.join(path, integrity.MANIFEST)):
        problems = integrity.verify(path)
        if problems:
            raise integrity.ChecksumError(f"checkpoint {path} failed verification: " + "; ".join(problems))
    handling = StrictHandling.ASSUME_OK_UNEXPECTED if not strict else StrictHandling.RAISE_ALL
    return dist_checkpointing.load(sharded_state_dict, path, strict=handling)


def model_sharded_state_dict(model) -> dict:
    return {"model": model.sharded_state_dict(prefix="")}


def load_model_weights(path: str, model) -> None:
    """Load only the model weights (e.g. an HF-imported checkpoint or a previous training stage)."""
    state = load_checkpoint(path, model_sharded_state_dict(model), strict=False)
    model.load_state_dict(state["model"], strict=True)
