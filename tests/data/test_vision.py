"""NaViT preprocessing against transformers' Qwen2-VL image processor (the PIL backend: no torchvision here)."""
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_mega.data import vision as V

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

# (min_pixels, max_pixels): the HF defaults, a tight cap that forces down-scaling, a floor that forces up-scaling
PIXEL_SETTINGS = [(56 * 56, 28 * 28 * 1280), (3136, 20000), (100 * 28 * 28, 200 * 28 * 28)]
SIZES = [(70, 100), (300, 211), (33, 57), (28, 28), (1000, 30), (17, 400), (224, 224)]


def _photo(h, w, seed):
    """A smooth image with texture (resampling errors show on edges and gradients, not on flat colour)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 3 + y * 5) % 256], -1)
    return np.clip(base + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)


def _jpeg(img, quality=90):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_smart_resize_matches_hf():
    checked = 0
    for h, w in itertools.product(range(1, 700, 13), range(1, 700, 17)):
        for lo, hi in PIXEL_SETTINGS:
            try:
                ref = hf_pil.smart_resize(h, w, 28, lo, hi)
            except ValueError:
                ref = "error"
            try:
                ours = V.smart_resize(h, w, 28, lo, hi)
            except ValueError:
                ours = "error"
            assert ours == ref, (h, w, lo, hi)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("min_pixels,max_pixels", PIXEL_SETTINGS)
def test_pixel_values_equal_hf_processor(min_pixels, max_pixels):
    proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    for i, (h, w) in enumerate(SIZES):
        # the same decoded image goes to both (decoded from a JPEG, as in training)
        img = V.decode_image_pil(_jpeg(_photo(h, w, i)))
        ref = proc(images=[img], return_tensors="np")
        rh, rw = V.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
        patches, grid = V.image_to_patches(V.resize_pil(img, rh, rw))
        assert grid == tuple(ref["image_grid_thw"][0]), (h, w)
        assert patches.dtype == np.float32 and patches.shape[1] == 1176
        # bit-identical: same PIL resize, same float64-then-float32 rescale and float32 normalize
        np.testing.assert_array_equal(patches, ref["pixel_values"])
        assert V.num_vision_tokens(grid) == patches.shape[0] // 4


def test_several_images_concatenate_like_hf():
    proc = hf_pil.Qwen2VLImageProcessorPil()
    imgs = [_photo(60, 90, 1), _photo(120, 50, 2), _photo(28, 28, 3)]
    ref = proc(images=imgs, return_tensors="np")
    ours = [V.image_to_patches(V.resize_pil(im, *V.smart_resize(*im.shape[:2])))for im in imgs]
    np.testing.assert_array_equal(np.concatenate([p for p, _ in ours]), ref["pixel_values"])
    assert [list(g) for _, g in ours] == ref["image_grid_thw"].tolist()


def _video_patches_reference(frames_chw: torch.Tensor, merge=2, patch=14, temporal=2):
    """transformers' Qwen2VLVideoProcessor.patchify layout (it needs torchvision, so it is restated here):
    view(gt, T, C, gh/m, m, p, gw/m, m, p) permuted to (gt, gh/m, gw/m, m, m, C, T, p, p)."""
    t, c, h, w = frames_chw.shape
    x = frames_chw.view(t // temporal, temporal, c, h // patch // merge, merge, patch, w // patch // merge, merge,
                        patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t // temporal * (h // patch) * (w // patch), c * temporal * patch * patch)


def test_video_patch_layout():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(4, 56, 84, 3), dtype=np.uint8)
    patches, grid = V.video_to_patches(frames)
    assert grid == (2, 4, 6)
    normed = torch.from_numpy(V.normalize(frames)).permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(torch.from_numpy(patches), _video_patches_reference(normed), rtol=0, atol=0)
    # an odd frame count repeats the last frame (as HF does)
    odd, grid_odd = V.video_to_patches(frames[:3])
    ref = _video_patches_reference(torch.from_numpy(V.normalize(frames[[0, 1, 2, 2]])).permute(0, 3, 1, 2))
    assert grid_odd == (2, 4, 6)
    torch.testing.assert_close(torch.from_numpy(odd), ref, rtol=0, atol=0)


def test_one_pass_patchify_equals_the_numpy_spec():
    """csrc/patchify.cpp (what image_to_patches runs) against patchify(normalize(two frames)) in numpy, on every
    uint8 level of every channel, non-square grids and merge sizes 1 and 2; the HF comparison above runs it too."""
    assert V._patchify is not None, "the C++ extension mllm_mega._patchify is not built (tools/setup_env.sh)"
    rng = np.random.default_rng(0)
    for (h, w), merge in (((56, 84), 2), ((28, 28), 2), ((42, 14), 1), ((28, 308), 2)):
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        img.reshape(-1)[:768] = np.arange(768) % 256  # every level in every channel
        ours, grid = V.image_to_patches(img, merge)
        ref, ref_grid = V.patchify(V.normalize(np.stack([img, img])), merge)
        assert grid == ref_grid and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(V.image_to_patches_numpy(img, merge)[0], ref)
    with pytest.raises(ValueError, match="not divisible"):
        V.image_to_patches(np.zeros((30, 28, 3), np.uint8))


def test_video_of_identical_frames_equals_image():
    img = _photo(56, 112, 5)
    image_patches, _ = V.image_to_patches(img)
    video_patches, grid = V.video_to_patches(np.stack([img, img]))
    assert grid == (1, 4, 8)
    np.testing.assert_array_equal(image_patches, video_patches)


def test_frame_sampling_matches_hf_rule():
    for total, cap in [(10, 4), (7, 16), (33, 8), (2, 2), (1, 8), (16, 5)]:
        idx = V.sample_frame_indices(total, cap)
        keep = min(total, cap)
        keep = keep - keep % 2 if keep >= 2 else keep
        ref = torch.arange(0, total, total / keep).int()[:keep].numpy()
        np.testing.assert_array_equal(idx, ref)
        assert len(idx) == keep and idx.max() < total


def _png(img):
    buf = io.BytesIO()
    (img if isinstance(img, Image.Image) else Image.fromarray(img)).save(buf, format="PNG")
    return buf.getvalue()


def _webp(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="WEBP")
    return buf.getvalue()


def test_probe_image_reads_size_and_rejects_bad_images():
    img = _photo(37, 61, 0)
    for enc in (_jpeg(img), _png(img), _webp(img)):
        assert V.probe_image(enc) == (37, 61)
        with pytest.raises(V.BadSample) as exc:
            V.probe_image(enc[: len(enc) * 2 // 3])
        assert exc.value.reason in ("image_truncated", "image_unreadable")
    with pytest.raises(V.BadSample) as exc:
        V.probe_image(_jpeg(img)[:-2])  # only the end marker missing
    assert exc.value.reason == "image_truncated"
    with pytest.raises(V.BadSample) as exc:
        V.probe_image(np.random.default_rng(0).bytes(3000))
    assert exc.value.reason == "image_unreadable"
    with pytest.raises(V.BadSample) as exc:
        V.probe_image(_jpeg(_photo(1, 1, 0)), min_side=10)
    assert exc.value.reason == "image_too_small"
    with pytest.raises(V.BadSample) as exc:
        V.probe_image(_png(_photo(2, 500, 0)))
    assert exc.value.reason == "image_aspect_ratio"


def test_probe_applies_exif_rotation():
    img = Image.fromarray(_photo(30, 50, 0))
    exif = Image.Exif()
    exif[V.EXIF_ORIENTATION] = 6  # rotated 90 degrees: decoders return a 50x30 image
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert V.probe_image(buf.getvalue()) == (50, 30)
    assert V.decode_image_pil(buf.getvalue()).shape == (50, 30, 3)


def test_jpeg_quality_is_a_function_of_seed_and_key():
    qs = [V.jpeg_quality_for(0, 0, f"k{i}", 0, 0.5, (75, 100)) for i in range(4000)]
    applied = [q for q in qs if q is not None]
    assert 0.45 < len(applied) / len(qs) < 0.55
    assert min(applied) == 75 and max(applied) == 100
    assert qs == [V.jpeg_quality_for(0, 0, f"k{i}", 0, 0.5, (75, 100)) for i in range(4000)]
    assert qs != [V.jpeg_quality_for(1, 0, f"k{i}", 0, 0.5, (75, 100)) for i in range(4000)]
    assert all(V.jpeg_quality_for(0, 0, f"k{i}", 0, 0.0, (75, 100)) is None for i in range(100))
    assert all(V.jpeg_quality_for(0, 0, f"k{i}", 0, 1.0, (80, 80)) == 80 for i in range(100))


def test_transparency_is_composited_like_hf():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (45, 70, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 0  # fully transparent rows: HF shows them white, a plain RGB conversion would not
    palette = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    proc = hf_pil.Qwen2VLImageProcessorPil()
    for img in (Image.fromarray(rgba, "RGBA"), palette, Image.fromarray(rgba[..., :2], "LA")):
        enc = _png(img) if img.mode != "RGBA" else _png(rgba)
        assert V.inspect_image(enc).has_alpha
        ref = proc(images=[Image.open(io.BytesIO(enc))], return_tensors="np")
        ours = V.decode_image_pil(enc)
        patches, _ = V.image_to_patches(V.resize_pil(ours, *V.smart_resize(*ours.shape[:2])))
        np.testing.assert_array_equal(patches, ref["pixel_values"])
    assert not V.inspect_image(_jpeg(_photo(30, 30, 0))).has_alpha
