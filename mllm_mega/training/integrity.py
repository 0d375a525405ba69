"""Checkpoint integrity: a manifest of every file of a checkpoint (size + fast content hash), checked on load.

``manifest.json`` in ``iter_XXXXXXX/`` lists each file (relative path -> size, hash). It is written into the
temporary ``iter_XXXXXXX.tmp`` after every rank has finished writing and before the rename, so a renamed
directory always carries it. Each rank hashes the files it wrote itself, right after the write (the bytes are
still in the page cache, so the save does not go back to the disk): torch DCP names a rank's shard files
``__{rank}_{k}.distcp``, and ``extra/rng_rank{rank}.pt`` is per rank; rank 0 takes the rest (metadata, common
state, train and data-loader state). Loading splits the files the same way, so the ranks verify in parallel and
then agree on the result.

The hash is xxh3-64 when ``xxhash`` is installed, else zlib's CRC-32 (in the standard library); the manifest
records which, so a checkpoint verifies on a machine with either.
"""
from __future__ import annotations

import json
import os
import re
import zlib

import torch
import torch.distributed as dist

MANIFEST = "manifest.json"
_CHUNK = 16 << 20  # large reads: hashing is then bound by memory bandwidth, not by Python calls
_OWNED = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"extra/rng_rank(\d+)\.pt$"))

try:
    import xxhash
except ImportError:
    xxhash = None

ALGORITHM = "xxh3_64" if xxhash is not None else "crc32"


class ChecksumError(ValueError):
    """A checkpoint whose files do not match its manifest (the message names every bad file)."""


def file_hash(path: str, algorithm: str = ALGORITHM) -> str:
    if algorithm == "xxh3_64":
        if xxhash is None:
            raise ChecksumError(f"{path}: the manifest uses xxh3_64; `pip install xxhash` to verify it")
        h = xxhash.xxh3_64()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    if algorithm != "crc32":
        raise ChecksumError(f"{path}: unknown hash algorithm {algorithm!r} in the manifest")
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def list_files(directory: str) -> list[str]:
    """Every file under DIRECTORY (relative, '/'-separated, sorted), the manifest itself excluded."""
    out = []
    for base, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(base, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def owner(rel: str, world: int) -> int:
    """The rank that hashes (on save) or verifies (on load) a file: its writer where the name says so."""
    for pattern in _OWNED:
        m = pattern.search(rel)
        if m:
            return int(m.group(1)) % world
    return 0


def _world_rank() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(obj) -> list:
    world, _ = _world_rank()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_manifest(directory: str, *, iteration: int) -> None:
    """Collective (every rank, after all writes into DIRECTORY are done): hash, gather, rank 0 writes."""
    world, rank = _world_rank()
    mine = {rel: {"size": os.path.getsize(os.path.join(directory, rel)),
                  "hash": file_hash(os.path.join(directory, rel))}
            for rel in list_files(directory) if owner(rel, world) == rank}
    entries = {}
    for part in _gather(mine):
        entries.update(part)
    if rank == 0:
        manifest = {"iteration": iteration, "algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}
        tmp = os.path.join(directory, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, MANIFEST))


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        algorithm = manifest["algorithm"]
        if not isinstance(files, dict) or not isinstance(algorithm, str):
            raise TypeError("files / algorithm have the wrong type")
    except FileNotFoundError:
        raise ChecksumError(f"{path} is missing (the save never completed)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ChecksumError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    return manifest


def check_files(directory: str, manifest: dict, rels) -> list[str]:
    """Problems (one line per bad file, naming it) among RELS of DIRECTORY's manifest."""
    problems = []
    for rel in rels:
        entry = manifest["files"][rel]
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
            continue
        digest = file_hash(path, manifest["algorithm"])
        if digest != entry["hash"]:
            problems.append(f"{path}: content hash {digest} != {entry['hash']} in the manifest (corrupted bytes)")
    return problems


def verify(directory: str, *, collective: bool = True) -> list[str]:
    """Problems of DIRECTORY against its manifest ([] = intact). Collective by default: each rank checks its
    share of the files and every rank gets the same list; ``collective=False`` checks all files here."""
    world, rank = _world_rank() if collective else (1, 0)
    problems = []
    try:
        manifest = read_manifest(directory)
        mine = [rel for rel in manifest["files"] if owner(rel, world) == rank]
        problems = check_files(directory, manifest, mine)
    except ChecksumError as e:
        problems = [str(e)]
    except OSError as e:  # e.g. a permission error: still a checkpoint we cannot trust
        problems = [f"{getattr(e, 'filename', None) or directory}: {e.strerror or e}"]
    if not collective:
        return problems
    seen, merged = set(), []
    for part in _gather(problems):
        for line in part:
            if line not in seen:  # a missing manifest is reported by every rank
                seen.add(line)
                merged.append(line)
    return merged


def first_nonfinite(named_tensors) -> str | None:
    """The name of the first floating-point tensor with a NaN/Inf, or None (a NaN-free state to save)."""
    for name, t in named_tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not torch.isfinite(t).all():
            return name
    return None


def nonfinite_state(model, optimizer) -> str | None:
    """The first weight, fp32 main parameter or optimizer state tensor (megatron's optimizer, chained or
    not, or a torch one) holding NaN/Inf on this rank, or None."""
    tensors = [(f"model.{n}", p) for n, p in model.named_parameters()]
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt = getattr(sub, "optimizer", sub)
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                tensors.append((f"optimizer group {g} main param {i}", p))
                tensors += [(f"optimizer group {g} param {i} {k}", v) for k, v in opt.state.get(p, {}).items()]
    return first_nonfinite(tensors)
