"""The reference log-prob file: exact round trip, atomic write, and errors that name the file and key."""
import json
import os

import pytest
import torch

from mllm_mega.objectives.ref_logps import (check_ref_logps_meta, data_fingerprint, default_ref_logps_path,
                                            lookup_ref_logps, read_ref_logps, write_ref_logps)

META = {"reference": {"load": "/ckpt", "iteration": 3}, "data": {"shards": [["a.tar", 10, "ab"]]},
        "layout": {"tp": 2, "pp": 1, "dp": 1}, "kernels": "torch", "dtype": "float32"}


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    sums = (torch.randn(50, 2) * 30).float()  # fp32 sums, stored as their float64
    mapping = {f"shard-0/{i:05d}": (float(c), float(r)) for i, (c, r) in enumerate(sums.tolist())}
    mapping["odd key \"with\" quotes/é"] = (-1e-30, -123456.78125)
    path = default_ref_logps_path(str(tmp_path), "sft")
    assert path == os.path.join(str(tmp_path), "ref_logps.sft.json")
    write_ref_logps(path, mapping, META)
    got, meta = read_ref_logps(path)
    assert got == mapping  # bit-exact floats
    # the fp32 sums survive as fp32 values
    assert torch.equal(torch.tensor([got[f"shard-0/{i:05d}"] for i in range(50)], dtype=torch.float32), sums)
    assert meta["num_pairs"] == 51 and meta["layout"] == META["layout"]
    assert os.listdir(tmp_path) == ["ref_logps.sft.json"]  # no temporary left


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "ref_logps.x.json")
    write_ref_logps(path, {"k": (-1.0, -2.0)}, META)
    with pytest.raises(ValueError, match="'bad'"):
        write_ref_logps(path, {"k2": (-1.0, -2.0), "bad": (float("nan"), 0.0)}, META)
    with pytest.raises(ValueError, match="meta lacks \\['data'\\]"):
        write_ref_logps(path, {"k": (-1.0, -2.0)}, {k: v for k, v in META.items() if k != "data"})
    assert read_ref_logps(path)[0] == {"k": (-1.0, -2.0)}
    assert os.listdir(tmp_path) == ["ref_logps.x.json"]


def test_read_errors_name_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="precompute_ref_logps"):
        read_ref_logps(str(tmp_path / "missing.json"))
    path = tmp_path / "ref_logps.bad.json"
    doc = {"format": "mllm_mega.ref_logps", "version": 1, "meta": {**META, "num_pairs": 1},
           "logps": {"s/1": [-1.0]}}
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"ref_logps.bad.json: key 's/1'"):
        read_ref_logps(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="ref_logps.bad.json: not a reference"):
        read_ref_logps(str(path))
    good = str(tmp_path / "ref_logps.good.json")
    write_ref_logps(good, {"s/1": (-1.0, -2.0)}, META)
    mapping, meta = read_ref_logps(good)
    assert lookup_ref_logps(good, mapping, ["s/1"]) == [(-1.0, -2.0)]
    with pytest.raises(KeyError, match="'s/2'"):
        lookup_ref_logps(good, mapping, ["s/1", "s/2"])
    check_ref_logps_meta(good, meta, {"reference": {"load": "/ckpt", "iteration": 3}, "kernels": "torch"})
    with pytest.raises(ValueError, match="made with reference="):
        check_ref_logps_meta(good, meta, {"reference": {"load": "/ckpt", "iteration": 4}})


def test_data_fingerprint_sees_content_changes(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"x" * 3000)
    before = data_fingerprint([str(shard)])
    assert before["shards"][0][:2] == ["s.tar", 3000]
    shard.write_bytes(b"x" * 2999 + b"y")
    assert data_fingerprint([str(shard)]) != before


def test_open_ref_logps_refuses_other_data_or_checkpoint(tmp_path):
    from mllm_mega.data.config import DataConfig
    from mllm_mega.objectives.ref_logps import data_shards, reference_meta, open_ref_logps

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.tar").write_bytes(b"a" * 100)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg = DataConfig(data_path=str(data))
    meta = {**META, "reference": reference_meta(str(ckpt)), "data": data_fingerprint(data_shards(cfg))}
    path = str(data / "ref_logps.ref.json")
    write_ref_logps(path, {"k": (-3.0, -4.0)}, meta)
    assert open_ref_logps(path, load=str(ckpt), data_cfg=cfg) == {"k": (-3.0, -4.0)}
    with pytest.raises(ValueError, match="made with reference="):
        open_ref_logps(path, load=str(tmp_path / "other"), data_cfg=cfg)
    (data / "b.tar").write_bytes(b"b" * 100)  # a shard more: other data
    with pytest.raises(ValueError, match="made with data="):
        open_ref_logps(path, load=str(ckpt), data_cfg=cfg)


def _fake_checkpoint(root, iteration, manifest: bytes):
    (root / f"iter_{iteration:07d}").mkdir(parents=True)
    (root / f"iter_{iteration:07d}" / "manifest.json").write_bytes(manifest)
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")


def test_a_moved_checkpoint_still_matches_by_its_manifest_digest(tmp_path):
    """The reference is identified by its tracked iteration's manifest digest: moving the directory keeps the
    file valid; other weights (another manifest) or another tracked iteration are refused."""
    import shutil

    from mllm_mega.data.config import DataConfig
    from mllm_mega.objectives.ref_logps import data_shards, open_ref_logps, reference_meta

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.tar").write_bytes(b"a" * 100)
    cfg = DataConfig(data_path=str(data))
    ckpt = tmp_path / "ckpt"
    _fake_checkpoint(ckpt, 5, b'{"files": {"a": 1}}')
    ref = reference_meta(str(ckpt))
    assert ref["iteration"] == 5 and ref["content"].startswith("sha256:")
    path = str(data / "ref_logps.ref.json")
    write_ref_logps(path, {"k": (-3.0, -4.0)}, {**META, "reference": ref, "data": data_fingerprint(data_shards(cfg))})
    moved = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, moved)
    shutil.rmtree(ckpt)
    assert open_ref_logps(path, load=str(moved), data_cfg=cfg) == {"k": (-3.0, -4.0)}
    other = tmp_path / "other"
    _fake_checkpoint(other, 5, b'{"files": {"a": 2}}')
    with pytest.raises(ValueError, match="made with reference="):
        open_ref_logps(path, load=str(other), data_cfg=cfg)
    _fake_checkpoint(moved, 6, b'{"files": {"a": 1}}')  # the same bytes at another iteration
    with pytest.raises(ValueError, match="made with reference="):
        open_ref_logps(path, load=str(moved), data_cfg=cfg)
