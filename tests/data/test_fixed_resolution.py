"""Fixed-resolution (SigLIP) image processing: pixel values against transformers' SiglipImageProcessor(Pil),
the loader's packs under image_processing="fixed" (placeholders, patches, isolation, resume), the DALI path."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.dali_decode import HAVE_DALI
from mllm_mega.data.fixed_resolution import FixedResolution, image_scheme
from mllm_mega.data.loader import build_eval_samples, build_train_loader
from mllm_mega.data.shards import iter_shard, list_shards, write_shard
from mllm_mega.data.text import TextProcessor
from mllm_mega.data.vision import decode_image_pil
from mllm_mega.models.positions import sequential_position_ids

siglip_pil = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")

HALF = (0.5, 0.5, 0.5)  # SigLIP-SO400M-patch14-384's preprocessor_config: mean = std = 0.5, bicubic, 1/255
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _flatten(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """(3, H, W) -> the agreed patch rows, in plain torch (the ViT's stride-p conv sees [:gh*p, :gw*p])."""
    _, h, w = pixels.shape
    gh, gw = h // p, w // p
    return pixels[:, : gh * p, : gw * p].reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images(rng):
    """(name, encoded bytes) over sizes smaller/larger than 384, non-square, 1xN, Nx1, and PIL modes."""
    def rgb(h, w):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    rgba = rng.integers(0, 256, (70, 50, 4), dtype=np.uint8)
    rgba[:30, :, 3] = 0  # fully transparent rows: composited onto white
    la = Image.fromarray(rng.integers(0, 256, (33, 41, 2), dtype=np.uint8), "LA")
    pal = rgb(45, 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decoded as 80x30
    return [("rgb 100x500", _encode(rgb(100, 500), "PNG")), ("rgb 600x450", _encode(rgb(600, 450), "PNG")),
            ("rgb 384x384", _encode(rgb(384, 384), "PNG")), ("rgb 1x37", _encode(rgb(1, 37), "PNG")),
            ("rgb 37x1", _encode(rgb(37, 1), "PNG")), ("jpeg 333x517", _encode(rgb(333, 517), "JPEG", quality=90)),
            ("L", _encode(rgb(50, 64).convert("L"), "JPEG")), ("RGBA", _encode(Image.fromarray(rgba), "PNG")),
            ("LA", _encode(la, "PNG")), ("P+transparency", _encode(pal, "PNG")),
            ("CMYK", _encode(rgb(40, 52).convert("CMYK"), "JPEG")),
            ("EXIF rotate", _encode(rgb(30, 80), "JPEG", exif=exif.tobytes()))]


@pytest.mark.parametrize("size,patch,mean,std,resample", [
    ((384, 384), 14, HALF, HALF, Image.Resampling.BICUBIC),  # SigLIP-SO400M-patch14-384 (27x27 patches)
    ((28, 42), 14, CLIP_MEAN, CLIP_STD, Image.Resampling.BILINEAR),  # non-square target, other stats and filter
])
def test_pixels_equal_siglip_processor(size, patch, mean, std, resample):
    scheme = FixedResolution(size, patch, 4, mean, std, int(resample))
    proc = siglip_pil.SiglipImageProcessorPil(size={"height": size[0], "width": size[1]}, resample=resample,
                                              image_mean=list(mean), image_std=list(std))
    for name, data in _images(np.random.default_rng(0)):
        ours = torch.from_numpy(scheme.process(decode_image_pil(data)))
        with Image.open(io.BytesIO(data)) as img:  # transformers' load_image applies the EXIF rotation too
            ref = proc(images=[ImageOps.exif_transpose(img)], return_tensors="pt")["pixel_values"][0]
        assert ours.shape == (size[0] // patch * (size[1] // patch), 3 * patch * patch), name
        assert torch.equal(ours, _flatten(ref, patch)), name  # bit-identical (measured max diff 0.0)


def test_fast_processor_is_close_not_identical():
    """The torchvision SiglipImageProcessor resizes with torch's antialiased bicubic, not PIL's: our pixels follow
    the PIL processor (above), these are the measured differences (torchvision 0.28 loaded from an unzipped wheel;
    not importable in the test environment, so this skips there)."""
    pytest.importorskip("torchvision")
    from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

    scheme = FixedResolution((384, 384), 14, 144, HALF, HALF)
    proc = SiglipImageProcessor(size={"height": 384, "width": 384})
    for name, data in _images(np.random.default_rng(0)):
        ours = torch.from_numpy(scheme.process(decode_image_pil(data)))
        with Image.open(io.BytesIO(data)) as img:
            ref = _flatten(proc(images=[ImageOps.exif_transpose(img)], return_tensors="pt")["pixel_values"][0], 14)
        levels = (ours - ref).abs() * 127.5
        if name == "rgb 384x384":  # no resize: only float rounding of the normalization (measured 5.9e-8)
            assert (ours - ref).abs().max() <= 1.2e-7, name
        else:  # measured max 17 levels (600x450 noise downscaled), mean <= 0.31 levels
            assert levels.max() <= 17 + 1e-3 and levels.mean() <= 0.35, name


def test_16bit_grey_is_rounded_not_clipped():
    """16-bit grey: we (and DALI) map v -> round(v / 257); the HF processor given the raw I;16 image clips at 255."""
    grey16 = (np.random.default_rng(1).integers(0, 65536, (30, 40))).astype(np.uint16)
    data = _encode(Image.fromarray(grey16), "PNG")
    scheme = FixedResolution((42, 42), 14, 9, HALF, HALF)
    proc = siglip_pil.SiglipImageProcessorPil(size={"height": 42, "width": 42})
    eight = Image.fromarray(np.round(grey16 / 257).astype(np.uint8), "L")
    ours = torch.from_numpy(scheme.process(decode_image_pil(data)))
    assert torch.equal(ours, _flatten(proc(images=[eight], return_tensors="pt")["pixel_values"][0], 14))
    with Image.open(io.BytesIO(data)) as img:
        clipped = _flatten(proc(images=[img], return_tensors="pt")["pixel_values"][0], 14)
    assert not torch.equal(ours, clipped)


def test_options_errors_name_the_key():
    ok = dict(image_processing="fixed", image_size=(42, 42), patch_size=14, tokens_per_image=4, image_mean=HALF,
              image_std=HALF)
    assert image_scheme() is None and image_scheme(**ok, position_ids_fn=sequential_position_ids).grid == (1, 3, 3)
    for bad, match in [(dict(ok, image_processing="static"), "image_processing must be one of"),
                       (dict(ok, image_sise=(4, 4)), "image_sise"),
                       ({k: v for k, v in ok.items() if k != "tokens_per_image"}, "tokens_per_image"),
                       (dict(ok, patch_size=50), "patch_size"), (dict(ok, image_std=(0.5, 0.5)), "image_std"),
                       (dict(ok, resample=9), "resample"),
                       (dict(patch_size=14), "need image_processing='fixed'")]:
        with pytest.raises(ValueError, match=match):
            image_scheme(**bad, position_ids_fn=sequential_position_ids)
    with pytest.raises(ValueError, match="MRoPE"):  # 4 tokens cannot be MRoPE positions of a 3x3 grid
        image_scheme(**ok)
    with pytest.raises(ValueError, match="resize_backend='pil'"):
        image_scheme(**dict(ok, resample=2), position_ids_fn=sequential_position_ids).check_resize_backend("dali")


# the loader: 42x42 images of 3x3 patches of 14 px, 4 tokens each (a 2x2 pooling), 1-D positions
OPTIONS = dict(image_processing="fixed", image_size=(42, 42), patch_size=14, tokens_per_image=4, image_mean=HALF,
               image_std=HALF, resample=3, rescale_factor=1 / 255, position_ids_fn=sequential_position_ids)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed")
    synthetic.make_dataset(str(out), 40, seed=3, num_eval=2, samples_per_shard=20, size_range=(20, 70),
                           multi_image_frac=0.3, video_frac=0.15)
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    rgba[:, :20, 3] = 0
    odd = [("grey", _encode(Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)), "JPEG")),
           ("rgba", _encode(Image.fromarray(rgba), "PNG")),
           ("cmyk", _encode(Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).convert("CMYK"),
                            "JPEG")),
           ("strip", _encode(Image.fromarray(rng.integers(0, 256, (10, 2500, 3), dtype=np.uint8)), "JPEG"))]  # 250:1
    write_shard(str(out / "train" / "shard-modes.tar"),
                [(k, {"jpg" if k != "rgba" else "png": d, "txt": b"one red circle"}) for k, d in odd])
    return out


def _cfg(dataset, **kw):
    return DataConfig(**{**dict(data_path=str(dataset / "train"), tokenizer_dir=str(dataset / "tokenizer"),
                                seq_len=160, buffer_size=12, jpeg_prob=0.0, num_workers=1, prefetch=0, epochs=1,
                                decoder="pil", seed=4), **kw})


def _raw_images(dataset):
    """{key: (encoded images in field order, has video)} read straight from the shards."""
    out = {}
    for shard in list_shards(str(dataset / "train")):
        for raw, _ in iter_shard(shard):
            names = sorted(n for n in raw.fields if n.split(".")[-1] in ("jpg", "png") and "video" not in n)
            out[raw.key] = ([raw.fields[n] for n in names], any(n.startswith("video") for n in raw.fields))
    return out


def test_loader_packs_fixed_resolution_images(dataset):
    raw = _raw_images(dataset)
    image_id = TextProcessor(str(dataset / "tokenizer")).image_token_id
    proc = siglip_pil.SiglipImageProcessorPil(size={"height": 42, "width": 42})
    loader = build_train_loader(_cfg(dataset), dp_rank=0, dp_size=1, **OPTIONS)
    seen, num_images, most = [], 0, 0
    for batch in loader:
        cu = batch["cu_seqlens"].tolist()
        assert cu[-1] == 160 and batch["num_real_tokens"] <= 160 and batch["input_ids"].shape == (160,)
        assert batch["pixel_values"].shape == (9 * batch["num_images"], 588)
        assert batch["image_grid_thw"].tolist() == [[1, 3, 3]] * batch["num_images"]
        refs = []
        for i, key in enumerate(batch["sample_keys"]):  # one cu_seqlens segment per sample, in order
            images, video = raw[key]
            assert not video
            segment = slice(cu[i], cu[i + 1])
            assert int((batch["input_ids"][segment] == image_id).sum()) == 4 * len(images), key
            assert batch["position_ids"][0, cu[i]] == 0 and batch["labels"][cu[i + 1] - 1] == -100  # isolated
            for data in images:
                with Image.open(io.BytesIO(data)) as img:
                    refs.append(_flatten(proc(images=[img], return_tensors="pt")["pixel_values"][0], 14))
        assert torch.equal(batch["pixel_values"], torch.cat(refs).reshape(-1, 588))  # bit-identical to HF
        seen += batch["sample_keys"]
        most = max(most, batch["num_samples"])
        num_images += batch["num_images"]
    videos = sum(v for _, v in raw.values())
    assert videos >= 3 and loader.skip_counts == {"video_not_supported": videos}
    assert sorted(seen) == sorted(k for k, (_, v) in raw.items() if not v) and num_images > len(seen)
    assert {"grey", "rgba", "cmyk", "strip"} <= set(seen) and most >= 3  # FFD packs several samples per context
    # eval samples: the same scheme through build_eval_samples (the eval split is one-image captions)
    ev = build_eval_samples(_cfg(dataset), path=str(dataset / "eval"), **OPTIONS)
    assert len(ev) == 2 and ev[0]["pixel_values"].shape == (9, 588) and ev[0]["image_grid_thw"].tolist() == [[1, 3, 3]]
    assert int((ev[0]["input_ids"] == image_id).sum()) == 4


def test_fixed_resolution_resume_is_exact(dataset):
    cfg = _cfg(dataset, jpeg_prob=0.5, epochs=None)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, **OPTIONS)
    for _ in range(2):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["buffer"] or state["ready"]
    expected = [next(loader) for _ in range(3)]
    resumed = build_train_loader(cfg, dp_rank=0, dp_size=1, **OPTIONS)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got["sample_keys"] == want["sample_keys"]
        for k in ("input_ids", "labels", "cu_seqlens", "pixel_values", "image_grid_thw", "position_ids"):
            assert torch.equal(got[k], want[k]), k
    with pytest.raises(ValueError, match="image_processing"):  # a state of the fixed scheme in a dynamic loader
        build_train_loader(cfg, dp_rank=0, dp_size=1).load_state_dict(state)


@pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
def test_dali_path(dataset):
    """DALI decode + PIL resize (the CPU default) is bit-identical to the PIL path, grey and CMYK JPEGs
    included; DALI's own cubic resize (resize_backend="dali", the GPU option) is not PIL's bicubic."""
    def run(**kw):
        loader = build_train_loader(_cfg(dataset, **kw), dp_rank=0, dp_size=1, **OPTIONS)
        assert loader.decoder_name == kw.get("decoder", "pil")
        return list(loader)

    pil, dali, dali_resize = run(), run(decoder="dali"), run(decoder="dali", resize_backend="dali")
    assert [b["sample_keys"] for b in dali] == [b["sample_keys"] for b in pil]
    for a, b, c in zip(pil, dali, dali_resize):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    diff = torch.cat([(a["pixel_values"] - c["pixel_values"]).abs().flatten() for a, c in zip(pil, dali_resize)])
    levels = diff * 0.5 * 255  # back to uint8 levels (std 0.5)
    # measured on these 20-70 px shapes scaled to 42x42: max 21 levels, mean 0.19 (antialiased cubic != PIL bicubic)
    assert 0 < levels.max() <= 21 + 1e-3 and levels.mean() < 0.25


@pytest.mark.gpu
def test_gpu_decoding_fixed_resolution():
    """Not run on CPU CI: nvJPEG decoding + PIL resize against the CPU PIL path (same packs, close pixels)."""
    if not torch.cuda.is_available() or not HAVE_DALI:
        pytest.skip("needs CUDA and DALI")
    import tempfile
    from pathlib import Path

    out = Path(tempfile.mkdtemp())
    synthetic.make_dataset(str(out), 24, seed=3, num_eval=1, size_range=(20, 70), multi_image_frac=0.3)
    gpu = build_train_loader(_cfg(out, decoder="dali", decode_device="gpu", resize_backend="pil"), dp_rank=0,
                             dp_size=1, **OPTIONS)
    cpu = build_train_loader(_cfg(out), dp_rank=0, dp_size=1, **OPTIONS)
    for a, b in zip(gpu, cpu):
        assert a["sample_keys"] == b["sample_keys"] and torch.equal(a["input_ids"], b["input_ids"])
        levels = (a["pixel_values"] - b["pixel_values"]).abs() * 127.5  # nvJPEG vs libjpeg-turbo IDCT: a few levels
        assert levels.mean() < 1 and levels.max() < 40
