"""WebDataset tar shards: listing, rank sharding, robust sequential reading, random access, atomic writing.

A WebDataset shard is a plain tar whose consecutive members sharing a key (the member name up to the first
dot of its basename) form one sample: ``s0001.jpg`` + ``s0001.txt`` is the sample ``s0001`` with the
fields ``jpg`` and ``txt``. Reading here never raises on bad data: a truncated tar yields every sample that
is complete before the cut and reports the cut (the sample being assembled at the cut is lost and counted),
a shard that is not a tar at all is reported as unreadable. Every yielded sample carries where its bytes are
in the file (the restore key used for exact resume) and the header offset where the next sample starts.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

BLOCK = 512  # tar block size; the archive ends with two zero blocks


@dataclass
class RawSample:
    """One WebDataset sample as read from a shard."""

    key: str
    shard: str
    fields: dict[str, bytes]
    # (field name, data offset, size) of each member: enough to re-read the sample without scanning the tar
    locations: list[tuple[str, int, int]] = field(default_factory=list)

    def restore_key(self) -> list:
        """JSON-serializable address of this sample's bytes (see :func:`read_sample_at`)."""
        return [self.shard, self.key, [list(loc) for loc in self.locations]]


@dataclass
class ShardEvent:
    """A problem found while reading a shard (``reason`` is a skip-count key)."""

    shard: str
    reason: str
    message: str


def list_shards(paths: str | Sequence[str]) -> list[str]:
    """Sorted tar shards named by ``paths``: directories (their ``*.tar``), globs or files, deduplicated."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    found: list[str] = []
    for spec in paths:
        spec = os.path.expanduser(str(spec))
        if os.path.isdir(spec):
            matches = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(ch in spec for ch in "*?["):
            matches = sorted(glob.glob(spec))
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise FileNotFoundError(f"data path {spec!r} is neither a directory, a glob nor a file")
        if not matches:
            splits = [d for d in ("train", "eval") if os.path.isdir(spec) and glob.glob(os.path.join(spec, d, "*.tar"))]
            hint = f"; it holds the splits {splits}: did you mean {os.path.join(spec, splits[0])!r}?" if splits else ""
            raise FileNotFoundError(f"data path {spec!r} contains no .tar shards{hint}")
        found.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(found))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = name up to the first dot of the basename, field = the rest (lower case)."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    key = os.path.join(directory, stem) if directory else stem
    return key, ext.lower() if dot else ""


def stable_hash(*parts) -> int:
    """64-bit hash of ``parts`` that is the same in every process and Python version (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shard_order(shards: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The shards in this epoch's order: sorted by a hash of (seed, epoch, basename), same on every rank."""
    return sorted(shards, key=lambda s: (stable_hash("shard-order", seed, epoch, os.path.basename(s)), s))


def rank_assignment(num_shards: int, dp_rank: int, dp_size: int) -> tuple[list[int], int, int]:
    """Which shard positions a data-parallel rank reads, and the sample stride/offset inside them.

    With at least as many shards as ranks, rank r reads positions r, r + dp_size, ... whole (every sample).
    With fewer shards than ranks every rank reads every shard and keeps samples i with i % dp_size == r,
    so no rank is left without data.
    """
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if num_shards >= dp_size:
        return list(range(dp_rank, num_shards, dp_size)), 1, 0
    return list(range(num_shards)), dp_size, dp_rank


def _archive_end_ok(f, end: int, file_size: int) -> bool:
    """True when the two zero blocks that close a tar follow the last member."""
    if file_size - end < 2 * BLOCK:
        return False
    f.seek(end)
    return f.read(2 * BLOCK) == bytes(2 * BLOCK)


def iter_shard(
    path: str, start_offset: int = 0, events: list[ShardEvent] | None = None
) -> Iterator[tuple[RawSample, int]]:
    """Yield ``(sample, next_offset)`` from ``path`` starting at the member header at ``start_offset``.

    ``next_offset`` is the header offset of the following sample (-1 after the last one): pass it back as
    ``start_offset`` to continue after that sample. Problems are appended to ``events`` (reasons
    ``unreadable_shard`` and ``truncated_tar``), never raised.
    """
    events = events if events is not None else []
    try:
        f = open(path, "rb")
    except OSError as exc:
        events.append(ShardEvent(path, "unreadable_shard", f"cannot open {path}: {exc}"))
        return
    with f:
        file_size = os.fstat(f.fileno()).st_size
        f.seek(start_offset)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as exc:
            # the first header does not parse: a tar cut inside it still shows the ustar magic
            f.seek(start_offset)
            head = f.read(BLOCK)
            is_tar = head[257:262] == b"ustar" or start_offset > 0
            reason = "truncated_tar" if is_tar else "unreadable_shard"
            events.append(ShardEvent(path, reason, f"{path}: {exc}"))
            return
        key, fields, locations, first_offset = None, {}, [], start_offset
        end = start_offset
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                events.append(ShardEvent(path, "truncated_tar", f"{path}: {exc} after byte {end}"))
                return
            if member is None:
                if not _archive_end_ok(f, end, file_size):
                    events.append(ShardEvent(path, "truncated_tar", f"{path}: no end-of-archive after byte {end}"))
                    return
                if key is not None:
                    yield RawSample(key, path, fields, locations), -1
                return
            if not member.isfile():
                continue
            member_key, ext = split_key(member.name)
            if key is not None and member_key != key:
                # a readable header of the next sample: the previous one is complete
                yield RawSample(key, path, fields, locations), member.offset
                fields, locations = {}, []
            key = member_key
            try:
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                events.append(ShardEvent(path, "truncated_tar", f"{path}: {exc} in member {member.name}"))
                return
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
            fields[ext] = data
            locations.append((ext, member.offset_data, member.size))


def read_sample_at(restore_key: Sequence) -> RawSample:
    """Re-read a sample from the address given by :meth:`RawSample.restore_key`."""
    shard, key, locations = restore_key
    fields = {}
    with open(shard, "rb") as f:
        for ext, offset, size in locations:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"shard {shard} is shorter than when sample {key!r} was read from it")
            fields[ext] = data
    return RawSample(key, shard, fields, [tuple(loc) for loc in locations])


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``(key, {field: bytes})`` samples to a tar at ``path`` (via a temporary name, then renamed).

    Members are written in sorted field order with zeroed metadata, so equal input gives equal bytes.
    Returns the number of samples written.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, fields in samples:
                if "." in os.path.basename(key):
                    raise ValueError(f"sample key {key!r} must not contain a dot (WebDataset splits on it)")
                for ext in sorted(fields):
                    data = fields[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count
