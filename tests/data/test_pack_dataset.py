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


def test_preference_pairs_with_a_models_fixed_resolution(tmp_path):
    """--preference --model: each pair is one unit whose length is what the training loader packs for it (both
    segments, media once), image tokens counted by the model's family (tiny Open-Qwen2VL: 42 px / 14 px patches
    pooled to 2x2 = 4 tokens per image, not the dynamic count)."""
    from mllm_mega.data.config import DataConfig
    from mllm_mega.data.loader import build_train_loader
    from mllm_mega.models import registry

    synthetic.make_dataset(str(tmp_path), 20, seed=4, num_eval=0, samples_per_shard=10, preference=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(registry.get("open_qwen2vl").tiny_config(projector_pool_grid=2)))
    out = tmp_path / "packed"
    cmd = [sys.executable, os.path.join(REPO, "tools", "pack_dataset.py"), "--data", str(tmp_path / "train"),
           "--out", str(out), "--seq-len", "300", "--preference", "--model", str(model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["preference"] is True and stats["image_processing"] == "fixed" and stats["skipped"] == {}
    index = json.load(open(out / "index.json"))
    counted = {s[0]: (s[1], s[2]) for p in index["packs"] for s in p["samples"]}
    assert len(counted) == 20 and not index["unpackable"]
    # the training loader, with the options the trainer gives it for this model
    cfg = DataConfig(data_path=str(tmp_path / "train"), tokenizer_dir=str(tmp_path / "tokenizer"), seq_len=300,
                     preference=True, decoder="pil", epochs=1, prefetch=0, num_workers=1)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, **registry.loader_options_of(str(model)))
    image_token = loader.text.image_token_id
    trained = {}
    for pack in loader:
        cu = pack["cu_seqlens"].tolist()
        for (s0, s1), key in zip(pack["pair_segments"].tolist(), pack["pair_keys"]):
            ids = pack["input_ids"].reshape(-1)[cu[s0]:cu[s1 + 1]]
            trained[key] = (cu[s1 + 1] - cu[s0], int((ids == image_token).sum()))
        # the ViT runs once per pair: pair i's 4 feature rows serve its chosen and its rejected placeholders
        n = len(pack["pair_keys"])
        assert pack["pixel_values"].shape == (n * 9, 3 * 14 * 14)  # 3x3 patches per image, no temporal patch
        expected = [r for i in range(n) for _ in range(2) for r in range(4 * i, 4 * i + 4)]
        assert pack["image_feature_index"].tolist() == expected
    assert set(trained) == set(counted)
    for key, (tokens, images) in counted.items():
        assert tokens == trained[key][0] and images == 1
        assert trained[key][1] == 2 * 4  # the image's 4 placeholders in the chosen and in the rejected segment
    # check_dataset --model runs the same loader: the same pairs and tokens
    check = subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_dataset.py"), "--data",
                            str(tmp_path / "train"), "--seq-len", "300", "--preference", "--model", str(model),
                            "--decoder", "pil"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    summary = json.loads(check.stdout.strip().splitlines()[-1])
    assert summary["samples_ok"] == 20 and summary["tokens"] == sum(t for t, _ in counted.values())
    # without --model the same pairs count Qwen2-VL's dynamic tokens (56-112 px images: 4-16 per image)
    proc = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "dynamic")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["image_processing"] == "dynamic"
    dynamic = {s[0]: s[1] for p in json.load(open(tmp_path / "dynamic" / "index.json"))["packs"] for s in p["samples"]}
    assert dynamic != {k: v[0] for k, v in counted.items()} and set(dynamic) == set(counted)
