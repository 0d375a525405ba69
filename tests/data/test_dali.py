"""DALI decoding: equal to PIL decoding, augmentation independent of the batch, bad images isolated."""
import io

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data import vision as V

dali_decode = pytest.importorskip("mllm_mega.data.dali_decode")
if not dali_decode.HAVE_DALI:
    pytest.skip("nvidia-dali is not installed", allow_module_level=True)
hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def _jpeg(h, w, seed, quality=90):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x * 7 + y) % 256], -1)
    img = np.clip(img + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def decoder():
    return dali_decode.DaliDecoder("cpu", num_threads=1, max_batch=4)


def test_dali_cpu_decode_equals_pil(decoder):
    encoded = [_jpeg(50 + 7 * i, 90 - 5 * i, i) for i in range(6)]  # more than max_batch: two DALI runs
    out = decoder.decode(encoded)
    for enc, img in zip(encoded, out):
        # both are libjpeg-turbo with the same IDCT and upsampling; equality is what we observed and rely on
        np.testing.assert_array_equal(img, V.decode_image_pil(enc))


def test_dali_pixels_through_the_hf_processor(decoder):
    """The acceptance check: DALI-decoded images, our resize/patchify vs transformers' processor."""
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=40000)
    for img in decoder.decode([_jpeg(123, 77, 1), _jpeg(300, 410, 2), _jpeg(40, 29, 3)]):
        ref = proc(images=[img], return_tensors="np")
        patches, grid = V.image_to_patches(V.resize_pil(img, *V.smart_resize(*img.shape[:2], min_pixels=3136,
                                                                             max_pixels=40000)))
        np.testing.assert_array_equal(patches, ref["pixel_values"])
        assert list(grid) == ref["image_grid_thw"][0].tolist()


def test_augmentation_is_per_image_and_batch_independent(decoder):
    encoded = [_jpeg(64, 64, i, quality=98) for i in range(5)]
    qualities = [75, None, 90, 75, None]
    full = decoder.decode(encoded, qualities)
    # each image alone, and in a different batch grouping, gives the same pixels
    for i, (enc, q) in enumerate(zip(encoded, qualities)):
        np.testing.assert_array_equal(decoder.decode([enc], [q])[0], full[i])
    plain = decoder.decode(encoded)
    for i, q in enumerate(qualities):
        if q is None:
            np.testing.assert_array_equal(full[i], plain[i])
        else:
            diff = np.abs(full[i].astype(int) - plain[i])
            assert diff.max() > 0  # the re-compression changed the image...
            assert diff.mean() < 12  # ...but only by JPEG artefacts


def test_bad_image_fails_alone():
    decoder = dali_decode.DaliDecoder("cpu", num_threads=1, max_batch=8)
    good = [_jpeg(40, 60, i) for i in range(3)]
    garbage = b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000)  # a JPEG signature, then noise
    out = decoder.decode([good[0], garbage, good[1], good[2]], [80, None, None, 80])
    assert isinstance(out[1], Exception)
    assert decoder.num_rebuilds >= 1
    alone = decoder.decode(good, [80, None, 80])
    for a, b in zip([out[0], out[2], out[3]], alone):
        np.testing.assert_array_equal(a, b)


def test_dali_resize_is_close_to_pil_bicubic():
    """The GPU path's resize: DALI antialiased cubic vs PIL bicubic on uint8 images.

    They are different filters, so equality is not expected; a few uint8 levels is the measured gap
    (max 4, mean ~0.2 on textured images), which is what the tolerance below encodes.
    """
    decoder = dali_decode.DaliDecoder("cpu", num_threads=1, max_batch=4, resize=True)
    plain = dali_decode.DaliDecoder("cpu", num_threads=1, max_batch=4)
    encoded = [_jpeg(100, 70, 0), _jpeg(200, 300, 1), _jpeg(64, 64, 2)]
    sizes = [V.smart_resize(h, w, max_pixels=20000) for h, w in [(100, 70), (200, 300), (64, 64)]]
    for resized, img, (h, w) in zip(decoder.decode(encoded, sizes=sizes), plain.decode(encoded), sizes):
        ref = V.resize_pil(img, h, w)
        diff = np.abs(resized.astype(int) - ref)
        assert resized.shape == (h, w, 3)
        assert diff.max() <= 6 and diff.mean() < 0.5


@pytest.mark.gpu
def test_dali_gpu_decode_matches_cpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    encoded = [_jpeg(480, 640, i) for i in range(4)]
    gpu = dali_decode.DaliDecoder("gpu", max_batch=4).decode(encoded, [None, 80, None, 95])
    cpu = dali_decode.DaliDecoder("cpu", max_batch=4).decode(encoded, [None, 80, None, 95])
    for a, b in zip(gpu, cpu):
        # nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg-turbo's
        assert a.shape == b.shape and np.abs(a.astype(int) - b).mean() < 2


def _corrupt_scan(jpeg: bytes) -> bytes:
    """Headers, tables and the end marker intact (passes every header check), the scan cut short inside:
    libjpeg decodes it with grey blocks and only a "Corrupt JPEG data" warning."""
    sos = jpeg.rfind(b"\xff\xda")
    return jpeg[:sos + 300] + jpeg[-2:]


def test_corrupt_scan_data_is_an_error_not_grey_blocks(decoder, capfd):
    good_a, good_b = _jpeg(48, 64, 1), _jpeg(40, 56, 2)
    bad = _corrupt_scan(_jpeg(64, 80, 3))
    V.inspect_image(bad)  # the header checks cannot see it
    out = decoder.decode([good_a, bad, good_b])
    assert isinstance(out[1], dali_decode.CorruptImageError) and "Corrupt JPEG data" in str(out[1])
    # the good images of the batch are decoded as on their own
    np.testing.assert_array_equal(out[0], decoder.decode([good_a])[0])
    np.testing.assert_array_equal(out[2], decoder.decode([good_b])[0])
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # turned into the error, not printed


def test_corrupt_jpeg_skipped_by_the_dali_loader(tmp_path):
    from mllm_mega.data import synthetic
    from mllm_mega.data.config import DataConfig
    from mllm_mega.data.loader import build_train_loader
    from mllm_mega.data.shards import write_shard

    synthetic.make_dataset(str(tmp_path / "d"), 2, seed=0, num_eval=1, samples_per_shard=2)
    write_shard(str(tmp_path / "s.tar"), [("bad", {"jpg": _corrupt_scan(_jpeg(64, 80, 3)), "txt": b"a cat"}),
                                          ("good", {"jpg": _jpeg(64, 80, 4), "txt": b"a dog"})])
    cfg = DataConfig(data_path=str(tmp_path / "s.tar"), tokenizer_dir=str(tmp_path / "d" / "tokenizer"),
                     seq_len=1024, buffer_size=8, jpeg_prob=0.0, epochs=1, decoder="dali", prefetch=0)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1)
    keys = [k for batch in loader for k in batch["sample_keys"]]
    assert keys == ["good"] and loader.skip_counts == {"image_decode_error": 1}
