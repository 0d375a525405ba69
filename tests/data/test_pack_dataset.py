"""tools/pack_dataset.py: header-based token counts, every sample packed once or reported, caps, shard bytes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data import synthetic
from mllm_mega.data.shards import iter_shard, list_shards, write_shard

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN, CAP = 200, 5


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    synthetic.make_dataset(str(root), 60, seed=2, num_eval=0, samples_per_shard=25, multi_image_frac=0.2)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(buf, format="JPEG")
    # a 300x300 image is 121 tokens: with a long caption it cannot fit in 200 tokens -> unpackable
    write_shard(str(root / "train" / "extra.tar"), [("huge", {"jpg": buf.getvalue(), "txt": b"red " * 80}),
                                                    ("broken", {"jpg": b"not an image", "txt": b"x"})])
    out = root / "packed"
    cmd = [sys.executable, os.path.join(REPO, "tools", "pack_dataset.py"), "--data", str(root / "train"),
           "--out", str(out), "--seq-len", str(SEQ_LEN), "--max-images-per-pack", str(CAP),
           "--packs-per-shard", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_sample_packed_once_or_reported(packed):
    root, out, stats = packed
    index = json.load(open(out / "index.json"))
    originals = {raw.key: raw for shard in list_shards(str(root / "train")) for raw, _ in iter_shard(shard)}
    packed_keys = [s[0] for p in index["packs"] for s in p["samples"]]
    assert sorted(packed_keys + [u[0] for u in index["unpackable"]]) == sorted(set(originals) - {"broken"})
    assert [u[0] for u in index["unpackable"]] == ["huge"] and stats["unpackable"] == 1
    assert stats["skipped"] == {"image_unreadable": 1}
    for p in index["packs"]:
        assert sum(s[1] for s in p["samples"]) <= SEQ_LEN and sum(s[2] for s in p["samples"]) <= CAP
    tokens = sum(s[1] for p in index["packs"] for s in p["samples"])
    assert stats["packing_efficiency"] == pytest.approx(tokens / (len(index["packs"]) * SEQ_LEN), abs=1e-6)
    assert stats["packs"] >= stats["lower_bound_packs"] == -(-tokens // SEQ_LEN)
    # packed shards hold the original bytes, pack after pack, in index order
    stored = [raw for shard in index["shards"] for raw, _ in iter_shard(str(out / shard))]
    assert [r.fields["key"].decode() for r in stored] == packed_keys
    for r in stored:
        original = originals[r.fields["key"].decode()]
        assert {k: v for k, v in r.fields.items() if k != "key"} == original.fields
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_header_token_counts_equal_decoded_counts(packed):
    """The tokens counted from image headers equal those of the HF processor on the decoded images."""
    root, out, _ = packed
    from mllm_mega.data.config import DataConfig
    from mllm_mega.data.samples import parse_sample
    from mllm_mega.data.text import TextProcessor
    from mllm_mega.data.vision import decode_image_pil

    cfg = DataConfig(data_path=str(root / "train"), tokenizer_dir=str(root / "tokenizer"), seq_len=SEQ_LEN)
    text = TextProcessor(cfg.tokenizer_dir)
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    index = json.load(open(out / "index.json"))
    counted = {s[0]: s[1] for p in index["packs"] for s in p["samples"]}
    stored = {raw.fields["key"].decode(): raw for shard in index["shards"] for raw, _ in iter_shard(str(out / shard))}
    for key, tokens in list(counted.items())[:25]:
        raw = stored[key]
        spec = parse_sample(raw, text, cfg)
        images = [decode_image_pil(v) for k, v in sorted(raw.fields.items()) if k.endswith("jpg")]
        grid = proc(images=images, return_tensors="np")["image_grid_thw"]
        vision_tokens = int((grid.prod(-1) // 4).sum())
        assert int((spec.token_types != 0).sum()) == vision_tokens
        assert spec.length == tokens
