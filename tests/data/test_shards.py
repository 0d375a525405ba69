"""Tar shard reading: every truncation point, resuming from offsets, random access, rank assignment."""
import os

import pytest

from mllm_mega.data.shards import (iter_shard, list_shards, rank_assignment, read_sample_at, shard_order,
                                   split_key, write_shard)

SAMPLES = [(f"s{i}", {"jpg": os.urandom(300 + 97 * i), "txt": f"caption {i}".encode()}) for i in range(6)]


@pytest.fixture()
def shard(tmp_path):
    path = str(tmp_path / "a.tar")
    assert write_shard(path, SAMPLES) == len(SAMPLES)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    return path


def test_full_read_and_restore(shard):
    events = []
    got = list(iter_shard(shard, events=events))
    assert events == []
    assert [(r.key, r.fields) for r, _ in got] == SAMPLES
    assert got[-1][1] == -1
    for raw, _ in got:
        assert read_sample_at(raw.restore_key()).fields == raw.fields
    # resuming at each returned offset gives exactly the rest
    for i, (_, offset) in enumerate(got[:-1]):
        rest = [r.key for r, _ in iter_shard(shard, offset)]
        assert rest == [k for k, _ in SAMPLES[i + 1:]]


def test_every_truncation_point_is_survived_and_reported(shard, tmp_path):
    data = open(shard, "rb").read()
    last = list(iter_shard(shard))[-1][0].locations[-1]
    # the archive proper ends with two zero blocks; tarfile pads the file further to a 10 KiB record
    archive_end = last[1] + -(-last[2] // 512) * 512 + 1024
    assert archive_end < len(data)
    cut_path = str(tmp_path / "cut.tar")
    for cut in sorted(set(range(0, archive_end, 97)) | set(range(0, archive_end, 512))):
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        events = []
        got = [(r.key, r.fields) for r, _ in iter_shard(cut_path, events=events)]
        # complete samples only, in order, and the cut is always reported (once)
        assert got == SAMPLES[: len(got)], cut
        assert len(events) == 1, cut
        assert events[0].reason in ("truncated_tar", "unreadable_shard")
        if cut >= 512:
            assert events[0].reason == "truncated_tar"
    for cut in (archive_end, len(data) - 512):
        with open(cut_path, "wb") as f:
            f.write(data[:cut])
        events = []
        assert len(list(iter_shard(cut_path, events=events))) == len(SAMPLES) and events == []


def test_not_a_tar(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(os.urandom(3000))
    events = []
    assert list(iter_shard(str(path), events=events)) == []
    assert [e.reason for e in events] == ["unreadable_shard"]


def test_split_key():
    assert split_key("a/b/s001.jpg") == ("a/b/s001", "jpg")
    assert split_key("s001.video.003.JPG") == ("s001", "video.003.jpg")
    assert split_key("noext") == ("noext", "")


def test_rank_assignment_and_order(tmp_path):
    for num_shards, size in [(8, 3), (3, 3), (2, 5), (1, 4)]:
        covered = []
        for rank in range(size):
            positions, stride, phase = rank_assignment(num_shards, rank, size)
            covered += [(p, s) for p in positions for s in range(12) if s % stride == phase]
        # every (shard, sample) pair exactly once across ranks
        assert sorted(covered) == [(p, s) for p in range(num_shards) for s in range(12)]
    with pytest.raises(ValueError):
        rank_assignment(4, 2, 2)
    names = [f"/d/s{i}.tar" for i in range(10)]
    assert shard_order(names, 0, 0) == shard_order(list(reversed(names)), 0, 0)
    assert shard_order(names, 0, 0) != shard_order(names, 0, 1)
    for i in range(3):
        write_shard(str(tmp_path / f"s{i}.tar"), SAMPLES[:1])
    assert len(list_shards(str(tmp_path))) == 3 and len(list_shards(str(tmp_path / "s*.tar"))) == 3
    with pytest.raises(FileNotFoundError, match="nope"):
        list_shards(str(tmp_path / "nope"))
