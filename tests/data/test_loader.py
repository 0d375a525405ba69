"""The loader end to end: exact resume, data-parallel sharding, eval samples, config errors."""
import json

import pytest
import torch

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.dali_decode import HAVE_DALI
from mllm_mega.data.loader import build_eval_samples, build_train_loader
from mllm_mega.data.shards import iter_shard, list_shards

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    synthetic.make_dataset(str(out), 64, seed=5, num_eval=6, samples_per_shard=16, multi_image_frac=0.2,
                           video_frac=0.1)
    return out


def _cfg(dataset, **kw):
    base = dict(data_path=str(dataset / "train"), tokenizer_dir=str(dataset / "tokenizer"), seq_len=256,
                buffer_size=24, jpeg_prob=0.5, video_min_pixels=56 * 56, video_max_pixels=112 * 112,
                num_workers=2, seed=11)
    base.update(kw)
    return DataConfig(**base)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("decoder,prefetch", [("dali", 2), ("pil", 0)])
def test_exact_resume(dataset, decoder, prefetch):
    if decoder == "dali" and not HAVE_DALI:
        pytest.skip("nvidia-dali is not installed")
    cfg = _cfg(dataset, decoder=decoder, prefetch=prefetch)
    k, more = 3, 9  # 12 packs of ~7 samples: past the end of the 64-sample epoch
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1)
    for _ in range(k):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))  # what a checkpoint stores
    assert state["buffer"] or state["ready"], "the test should resume with samples waiting in the buffer"
    expected = [next(loader) for _ in range(more)]
    assert loader.state_dict()["stream"]["epoch"] >= 1
    # the resumed loader prefetches the other way round: prefetching must not change the stream
    resumed = build_train_loader(_cfg(dataset, decoder=decoder, prefetch=2 - prefetch), dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    for want in expected:
        _assert_batches_equal(next(resumed), want)
    assert resumed.skip_counts == loader.skip_counts and resumed.stats == loader.stats
    # the augmentation really was on: some images differ from an unaugmented run of the same packs
    plain = build_train_loader(_cfg(dataset, decoder=decoder, jpeg_prob=0.0), dp_rank=0, dp_size=1)
    plain.load_state_dict(state)
    first = next(plain)
    assert first["sample_keys"] == expected[0]["sample_keys"]
    assert not torch.equal(first["pixel_values"], expected[0]["pixel_values"])


def test_state_mismatch_is_an_error(dataset):
    state = build_train_loader(_cfg(dataset), dp_rank=0, dp_size=1).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        build_train_loader(_cfg(dataset, seq_len=512), dp_rank=0, dp_size=1).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(_cfg(dataset), dp_rank=1, dp_size=2).load_state_dict(state)


def _epoch_keys(cfg, dp_rank, dp_size):
    keys = []
    for batch in build_train_loader(cfg, dp_rank=dp_rank, dp_size=dp_size):
        keys += batch["sample_keys"]
    return keys


@pytest.mark.parametrize("data", ["all_shards", "one_shard"])
def test_data_parallel_ranks_partition_the_data(dataset, data):
    path = str(dataset / "train") if data == "all_shards" else str(dataset / "train" / "shard-000001.tar")
    cfg = _cfg(dataset, data_path=path, epochs=1, jpeg_prob=0.0, decoder="pil")
    everything = [raw.key for shard in list_shards(path) for raw, _ in iter_shard(shard)]
    ranks = [_epoch_keys(cfg, r, 3) for r in range(3)]
    union = [k for keys in ranks for k in keys]
    assert sorted(union) == sorted(everything)  # each sample exactly once (no bad samples in this data)
    assert all(len(keys) > 0 for keys in ranks)
    assert sorted(_epoch_keys(cfg, 0, 1)) == sorted(everything)


def test_eval_samples_match_hf(dataset):
    cfg = _cfg(dataset, eval_data_path=str(dataset / "eval"))
    samples = build_eval_samples(cfg)
    assert len(samples) == 6
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    from mllm_mega.data.text import TextProcessor
    from mllm_mega.data.vision import decode_image_pil

    text = TextProcessor(cfg.tokenizer_dir)
    raws = {raw.key: raw for shard in list_shards(cfg.eval_data_path) for raw, _ in iter_shard(shard)}
    for s in samples:
        raw = raws[s["key"]]
        ref = proc(images=[decode_image_pil(raw.fields["jpg"])], return_tensors="pt")
        torch.testing.assert_close(s["pixel_values"], ref["pixel_values"], rtol=0, atol=0)
        torch.testing.assert_close(s["image_grid_thw"], ref["image_grid_thw"], rtol=0, atol=0)
        assert s["caption"] == raw.fields["txt"].decode()
        n = int(ref["image_grid_thw"].prod()) // 4
        assert s["input_ids"].tolist() == [text.vision_start_id] + [text.image_token_id] * n + [text.vision_end_id]
        assert s["position_ids"].shape == (3, n + 2)


def test_config_validation():
    with pytest.raises(ValueError, match="loss_reweighting"):
        DataConfig(loss_reweighting="mean")
    with pytest.raises(ValueError, match="jpeg_quality"):
        DataConfig(jpeg_quality=(90, 80))
    with pytest.raises(ValueError, match="did you mean 'seq_len'"):
        DataConfig.from_dict({"seq_length": 10})
    with pytest.raises(ValueError, match="min_pixels"):
        DataConfig(min_pixels=10_000, max_pixels=100)


def test_transparent_images_match_hf_through_the_loader(dataset, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from mllm_mega.data.shards import write_shard

    rgba = np.random.default_rng(0).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    rgba[:25, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    write_shard(str(tmp_path / "a.tar"), [("rgba", {"png": buf.getvalue(), "txt": b"one red circle"})])
    cfg = _cfg(dataset, data_path=str(tmp_path), epochs=1, jpeg_prob=0.0)  # default decoder: DALI when installed
    batch = next(iter(build_train_loader(cfg, dp_rank=0, dp_size=1)))
    ref = hf_pil.Qwen2VLImageProcessorPil()(images=[Image.open(io.BytesIO(buf.getvalue()))], return_tensors="pt")
    torch.testing.assert_close(batch["pixel_values"], ref["pixel_values"], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_decoding_loader_matches_cpu(dataset):
    if not torch.cuda.is_available() or not HAVE_DALI:
        pytest.skip("needs CUDA and DALI")
    gpu = build_train_loader(_cfg(dataset, decode_device="gpu", jpeg_prob=0.0), dp_rank=0, dp_size=1)
    cpu = build_train_loader(_cfg(dataset, decode_device="cpu", jpeg_prob=0.0), dp_rank=0, dp_size=1)
    assert gpu.resize_backend == "dali"
    for _ in range(3):
        a, b = next(gpu), next(cpu)
        assert a["sample_keys"] == b["sample_keys"]
        torch.testing.assert_close(a["input_ids"], b["input_ids"], rtol=0, atol=0)
        torch.testing.assert_close(a["image_grid_thw"], b["image_grid_thw"], rtol=0, atol=0)
        # nvJPEG vs libjpeg-turbo decoding and DALI cubic vs PIL bicubic resizing: a few uint8 levels
        # (1/255 / CLIP std ~ 0.015 per level in normalized units)
        diff = (a["pixel_values"] - b["pixel_values"]).abs()
        assert diff.mean() < 0.03 and diff.max() < 0.6


# --- systematic failure: loud and bounded, never an endless loop -----------------------------------------
def _next_within(loader, seconds=120):
    """next(loader) in a thread: a loader that loops forever fails the test instead of hanging it."""
    import threading

    out = {}

    def run():
        try:
            out["batch"] = next(loader)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["exc"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"next() did not return within {seconds}s (skips so far: {loader._skip_counts})"
    return out


def _broken_decoder(monkeypatch, fail_every=1):
    """PIL decoding that fails on every ``fail_every``-th call (1: always), as a broken install would."""
    from mllm_mega.data import loader as loader_mod

    real, calls = loader_mod.decode_image_pil, [0]

    def decode(data):
        calls[0] += 1
        if calls[0] % fail_every == 0:
            raise OSError("simulated broken decoder")
        return real(data)

    monkeypatch.setattr(loader_mod, "decode_image_pil", decode)
    return calls


@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_decode_failing_raises_with_reason_counts(dataset, monkeypatch, prefetch):
    from mllm_mega.data.loader import DataPipelineError

    _broken_decoder(monkeypatch)
    loader = build_train_loader(_cfg(dataset, decoder="pil", prefetch=prefetch), dp_rank=0, dp_size=1)
    out = _next_within(loader)
    assert isinstance(out.get("exc"), DataPipelineError), out
    msg = str(out["exc"])
    # default max_consecutive_skips=1000, but two epochs' worth (2 x 64 samples) comes first
    assert "128 samples in a row" in msg and "two epochs' worth: 64 samples per epoch" in msg, msg
    assert sum(loader._skip_counts.values()) == 128 and f"Skips by reason: {dict(sorted(loader._skip_counts.items()))}" in msg
    assert loader._skip_counts["image_decode_error"] > 100  # (the frame-sequence videos count as video_error)
    assert "simulated broken decoder" in msg and "Traceback" in msg  # the first failure, with its traceback
    loader.close()


def test_consecutive_skip_limit_is_exact_and_resets_on_success(dataset, monkeypatch):
    from mllm_mega.data.loader import DataPipelineError

    _broken_decoder(monkeypatch)
    loader = build_train_loader(_cfg(dataset, decoder="pil", prefetch=0, max_consecutive_skips=5),
                                dp_rank=0, dp_size=1)
    with pytest.raises(DataPipelineError, match=r"5 samples in a row .*data.max_consecutive_skips=5"):
        next(loader)
    assert sum(loader._skip_counts.values()) == 5
    # one image in three failing is bad data, not a systematic failure: a good sample resets the run
    monkeypatch.undo()
    _broken_decoder(monkeypatch, fail_every=3)
    loader = build_train_loader(_cfg(dataset, decoder="pil", prefetch=0, max_consecutive_skips=5),
                                dp_rank=0, dp_size=1)
    for _ in range(12):  # past the end of the first epoch
        next(loader)
    assert loader.skip_counts.get("image_decode_error", 0) >= 10


def test_unreadable_shards_raise_instead_of_looping(dataset, tmp_path):
    from mllm_mega.data.loader import DataPipelineError

    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"not a tar file" * 100)
    loader = build_train_loader(_cfg(dataset, data_path=str(tmp_path), prefetch=0), dp_rank=0, dp_size=1)
    out = _next_within(loader)
    assert isinstance(out.get("exc"), DataPipelineError), out
    assert "read no sample from any of its 2 shard(s)" in str(out["exc"])


def test_default_jpeg_quality_range():
    """InternVL2.5's augmentation: JPEG quality uniform in [75, 100] (../shared/ANCHORS.md)."""
    from mllm_mega.data.vision import jpeg_quality_for

    cfg = DataConfig()
    assert cfg.jpeg_quality == (75, 100) and cfg.jpeg_prob == 0.5
    qs = [jpeg_quality_for(0, 0, f"k{i}", 0, 1.0, cfg.jpeg_quality) for i in range(2000)]
    assert min(qs) == 75 and max(qs) == 100
