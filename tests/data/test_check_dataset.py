"""Every kind of bad sample goes through tools/check_dataset.py with exact skip counts, nothing else lost."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data import synthetic
from mllm_mega.data.shards import write_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _img(h, w, fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _bad_huffman(jpeg: bytes) -> bytes:
    """Headers and end marker intact (passes the header checks), Huffman table garbage (fails to decode)."""
    i = jpeg.find(b"\xff\xc4")
    out = bytearray(jpeg)
    out[i + 5:i + 21] = b"\xff" * 16
    return bytes(out)


def _caption(key, image=None, text=b"two red circles on the left"):
    return key, {"jpg": image if image is not None else _img(64, 80), "txt": text}


def _conv(text, n_answers=1):
    turns = [{"from": "human", "value": text}] + [{"from": "gpt", "value": "two"}] * n_answers
    return json.dumps({"conversations": turns}).encode()


def _truncate_file(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    synthetic.make_dataset(str(root), 20, seed=1, num_eval=0, samples_per_shard=10)  # 20 good samples
    train = root / "train"
    good = _img(64, 80)
    samples = [
        _caption("ok1"), _caption("ok2"),
        _caption("decodeerr", _bad_huffman(good)),
        _caption("truncjpg", good[: len(good) // 2]),
        _caption("randbytes", np.random.default_rng(0).bytes(3000)),
        ("nojson", {"jpg": good}),
        ("badjson", {"jpg": good, "json": b"{not json"}),
        ("noanswer", {"jpg": good, "json": json.dumps({"conversations": [{"from": "human", "value": "hi"}]}).encode()}),
        ("missingimg", {"jpg": good, "json": _conv("<image> <image> How many?")}),
        ("extraimg", {"0.jpg": good, "1.jpg": good, "json": _conv("<image> How many?")}),
        _caption("tiny", _img(1, 1)),
        _caption("aspect", _img(12, 2500, "PNG")),
        _caption("toolong", text=b"red " * 400),
        ("badframes", {"video.000.jpg": _img(64, 64), "video.001.jpg": _img(64, 80), "txt": b"a red circle"}),
        ("unknownfield", {"jpg": good, "txt": b"one blue square", "cls": b"3"}),  # extra fields are fine
    ]
    write_shard(str(train / "bad-a.tar"), samples)
    # cut inside the 4th sample's image: 3 samples survive, the 4th is lost and counted
    write_shard(str(train / "bad-b.tar"), [_caption(f"b{i}") for i in range(5)])
    import tarfile

    with tarfile.open(train / "bad-b.tar") as tar:
        members = tar.getmembers()
    _truncate_file(train / "bad-b.tar", members[6].offset_data + 100)
    # cut exactly at a member boundary after sample 3's image (no end-of-archive blocks): 2 survive
    write_shard(str(train / "bad-d.tar"), [_caption(f"d{i}") for i in range(4)])
    with tarfile.open(train / "bad-d.tar") as tar:
        members = tar.getmembers()
    _truncate_file(train / "bad-d.tar", members[5].offset)
    # not a tar at all
    (train / "bad-c.tar").write_bytes(np.random.default_rng(1).bytes(5000))
    return root


def test_check_dataset_counts_every_bad_sample(bad_dataset):
    cmd = [sys.executable, os.path.join(REPO, "tools", "check_dataset.py"), "--data", str(bad_dataset / "train"),
           "--seq-len", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == {
        "image_decode_error": 1, "image_truncated": 1, "image_unreadable": 1, "missing_text": 1,
        "json_malformed": 2, "missing_image": 1, "unused_image": 1, "image_too_small": 1,
        "image_aspect_ratio": 1, "too_long": 1, "video_error": 1, "truncated_tar": 2, "unreadable_shard": 1,
    }, proc.stderr[-3000:]
    # 20 synthetic + ok1, ok2, unknownfield + 3 before the cut in bad-b + 2 before the cut in bad-d
    assert summary["samples_ok"] == 20 + 3 + 3 + 2
    assert summary["packs"] >= 1 and 0 < summary["packing_efficiency"] <= 1
    assert summary["shards"] == 6
    assert "[image_decode_error] decodeerr" in proc.stderr


def test_shard_problems_are_reported_with_the_shard(bad_dataset):
    from mllm_mega.data.shards import iter_shard

    events = []
    keys = [raw.key for raw, _ in iter_shard(str(bad_dataset / "train" / "bad-b.tar"), events=events)]
    assert keys == ["b0", "b1", "b2"]
    assert [e.reason for e in events] == ["truncated_tar"] and "bad-b.tar" in events[0].message


def test_dataset_root_is_named_with_the_split_to_use(tmp_path):
    """The synthetic tool writes ROOT/train and ROOT/eval: --data ROOT exits 2 pointing at ROOT/train."""
    root = tmp_path / "synth"
    synthetic.make_dataset(str(root), 4, 0, num_eval=2, samples_per_shard=4)
    res = subprocess.run([sys.executable, "tools/check_dataset.py", "--data", str(root)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"did you mean '{root / 'train'}'" in res.stderr
    res = subprocess.run([sys.executable, "tools/check_dataset.py", "--data", str(root / "train")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and json.loads(res.stdout.splitlines()[-1])["samples_ok"] == 4, res.stderr[-2000:]
