"""Real-world image variants through the loader, on both decoding backends, against transformers' processor.

Cases seen in the wild that used to be lost or decoded differently by the two backends: EXIF orientation in
PNG/WebP, multi-picture JPEGs (Pillow's "MPO": most phone photos), GIF/BMP/TIFF fields, 16-bit greyscale
PNG, image formats we do not decode. The reference is transformers' Qwen2VLImageProcessorPil given the image
as PIL opens it, EXIF-transposed (what `transformers.image_utils.load_image` does).
"""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.dali_decode import HAVE_DALI
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.shards import write_shard

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
DECODERS = ["pil"] + (["dali"] if HAVE_DALI else [])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    synthetic.make_dataset(str(out), 2, seed=0, num_eval=1, samples_per_shard=2)
    return str(out / "tokenizer")


def _rgb(h, w, seed):
    # smooth content: lossy formats stay close, and a rotation is obvious
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.02, 0.2, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x * y / (h + w))], -1)
    return ((img + 1) * 127.5).astype(np.uint8)


def _encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _with_orientation(array, fmt, orientation=6):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(array, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {}))


def _mpo(array):
    buf = io.BytesIO()
    first, second = Image.fromarray(array), Image.fromarray(255 - array)
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


def _animated_gif(array):
    buf = io.BytesIO()
    frames = [Image.fromarray(array).quantize(64), Image.fromarray(255 - array).quantize(64)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _grey16(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 977 + y * 3313) % 65536).astype(np.uint16)


def _run_loader(tmp_path, tokenizer, samples, decoder):
    """Every sample (one image each) through the loader: {key: pixel_values rows}, skip counts."""
    path = str(tmp_path / f"{decoder}.tar")
    write_shard(path, samples)
    cfg = DataConfig(data_path=path, tokenizer_dir=tokenizer, seq_len=4096, buffer_size=64, jpeg_prob=0.0,
                     epochs=1, decoder=decoder, prefetch=0, num_workers=1, min_pack_fill=0.0)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1)
    out = {}
    for batch in loader:
        rows = batch["image_grid_thw"].prod(-1).tolist()
        for key, pv in zip(batch["sample_keys"], torch.split(batch["pixel_values"], rows)):
            out[key] = pv
    return out, loader.skip_counts


def _hf(image: Image.Image):
    ref = hf_pil.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    return ref(images=[image], return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("decoder", DECODERS)
def test_real_world_variants_match_hf(tmp_path, tokenizer, decoder):
    base = _rgb(60, 90, 0)
    images = {
        "png_exif6": _with_orientation(base, "PNG"),
        "webp_exif6": _with_orientation(base, "WEBP"),
        "jpeg_exif8": _with_orientation(base, "JPEG", 8),
        "mpo": _mpo(base),
        "gif": _animated_gif(base),
        "bmp": _encode(base, "BMP"),
        "tiff": _encode(base, "TIFF"),
    }
    fields = {"gif": "gif", "bmp": "bmp", "tiff": "tiff", "png_exif6": "png", "webp_exif6": "webp"}
    samples = [(key, {fields.get(key, "jpg"): data, "txt": b"a smooth pattern"}) for key, data in images.items()]
    got, skips = _run_loader(tmp_path, tokenizer, samples, decoder)
    assert skips == {} and sorted(got) == sorted(images)
    for key, data in images.items():
        ref_image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # frame 0 for GIF and MPO
        ref = _hf(ref_image)
        assert got[key].shape == ref.shape, key  # a missed rotation changes the grid
        # DALI's libjpeg-turbo and Pillow's decode these identically (measured): exact
        torch.testing.assert_close(got[key], ref, rtol=0, atol=0, msg=key)


def test_16bit_grey_png_is_scaled_the_same_by_both_backends(tmp_path, tokenizer):
    grey = _grey16(56, 84)
    data = _encode(grey, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    results = {d: _run_loader(tmp_path, tokenizer, [("g16", {"png": data, "txt": b"grey"})], d)[0]["g16"]
               for d in DECODERS}
    # documented scaling: round(v / 257) to 8 bits (DALI's); PIL's convert("RGB") would clip to white
    expected = _hf(Image.fromarray(np.round(grey / 257).astype(np.uint8)))
    for decoder, pv in results.items():
        torch.testing.assert_close(pv, expected, rtol=0, atol=0, msg=decoder)
    clipped = _hf(Image.open(io.BytesIO(data)))
    assert not torch.equal(clipped, expected)  # the naive path really is different


def test_unsupported_image_field_is_a_counted_skip(tmp_path, tokenizer):
    good = _encode(_rgb(56, 56, 1), "JPEG")
    samples = [("heic", {"heic": b"\x00\x00\x00\x18ftypheic", "txt": b"a photo"}),
               ("ok", {"jpg": good, "txt": b"a photo"})]
    got, skips = _run_loader(tmp_path, tokenizer, samples, "pil")
    assert sorted(got) == ["ok"] and skips == {"image_unreadable": 1}
