"""parse_sample: field naming, media order, truncation that never cuts an image, skip reasons."""
import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.samples import parse_sample
from mllm_mega.data.shards import RawSample, write_shard
from mllm_mega.data.text import IMAGE, VIDEO, TextProcessor
from mllm_mega.data.vision import BadSample, smart_resize


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    synthetic.train_tokenizer(["two red circles on the left", "How many shapes are there?"] * 20,
                              str(out / "tokenizer"), vocab_size=300)
    return str(out / "tokenizer")


@pytest.fixture(scope="module")
def text(tok_dir):
    return TextProcessor(tok_dir)


def _jpeg(h, w):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _raw(fields):
    return RawSample("k", "/nonexistent.tar", fields, [])


def _cfg(tok_dir, **kw):
    return DataConfig(data_path="unused", tokenizer_dir=tok_dir, **kw)


def test_media_order_follows_placeholders(text, tok_dir):
    conv = {"conversations": [{"from": "human", "value": "<video> then <image> then <image>"},
                              {"from": "gpt", "value": "two"}]}
    fields = {"json": json.dumps(conv).encode(), "img1.jpg": _jpeg(56, 112), "img0.jpg": _jpeg(84, 56),
              "video.000.jpg": _jpeg(56, 56), "video.001.jpg": _jpeg(56, 56)}
    spec = parse_sample(_raw(fields), text, _cfg(tok_dir, video_min_pixels=56 * 56))
    assert [m.kind for m in spec.media] == [VIDEO, IMAGE, IMAGE]
    # images in index order: img0 (84x56) first, then img1 (56x112)
    assert [m.size for m in spec.media] == [(56, 56), (84, 56), (56, 112)]
    # token runs follow the same order with the right lengths
    runs = [(kind, len(list(group))) for kind, group in itertools.groupby(spec.token_types.tolist()) if kind]
    assert runs == [(m.kind, m.num_tokens) for m in spec.media]
    assert spec.media[0].grid == (1, 4, 4) and spec.media[1].grid == (1, 6, 4)


def test_truncation_keeps_images_whole(text, tok_dir):
    caption = ("two red circles on the left " * 30).encode()
    fields = {"jpg": _jpeg(56, 56), "txt": caption}
    full = parse_sample(_raw(fields), text, _cfg(tok_dir, seq_len=100_000)).length
    n_img = 4  # 56x56 -> 2x2 merged tokens
    with pytest.raises(BadSample) as exc:
        parse_sample(_raw(fields), text, _cfg(tok_dir, seq_len=full - 1))
    assert exc.value.reason == "too_long"
    spec = parse_sample(_raw(fields), text, _cfg(tok_dir, seq_len=full - 10, truncate=True))
    assert spec.length == full - 10 and (spec.token_types != 0).sum() == n_img
    # a cut right after the image pads would drop <|vision_end|>: not allowed
    with pytest.raises(BadSample) as exc:
        parse_sample(_raw(fields), text, _cfg(tok_dir, seq_len=1 + n_img, truncate=True))
    assert exc.value.reason == "too_long"
    spec = parse_sample(_raw(fields), text, _cfg(tok_dir, seq_len=n_img + 4, truncate=True))
    assert spec.input_ids[n_img + 1] == text.vision_end_id and spec.supervised[n_img + 2:].all()


@pytest.mark.parametrize("fields,reason,kw", [
    ({"jpg": _jpeg(56, 56), "txt": b"  "}, "missing_text", {}),
    ({"json": json.dumps({"conversations": [{"from": "human", "value": "How many shapes? " * 40},
                                            {"from": "gpt", "value": "two"}]}).encode()},
     "no_labels", {"seq_len": 60, "truncate": True}),
    ({"0.jpg": _jpeg(56, 56), "1.jpg": _jpeg(56, 56), "2.jpg": _jpeg(56, 56), "txt": b"x"}, "too_many_images",
     {"max_images_per_pack": 2}),
    ({"jpg": _jpeg(56, 56), "txt": b"\xff\xfe"}, "missing_text", {}),
    ({"jpg": _jpeg(56, 56), "json": b'{"fps": 2}'}, "json_malformed", {}),
    ({"video.000.jpg": _jpeg(56, 56), "txt": b"x", "json": b'{"fps": -1}'}, "json_malformed", {}),
    ({"jpg": _jpeg(56, 56), "txt": b"look <|image_pad|>"}, "placeholder_mismatch", {}),
])
def test_skip_reasons(text, tok_dir, fields, reason, kw):
    with pytest.raises(BadSample) as exc:
        parse_sample(_raw(fields), text, _cfg(tok_dir, **kw))
    assert exc.value.reason == reason


def test_video_frames_resized_with_video_limits(text, tok_dir):
    frames = {f"video.{i:03d}.jpg": _jpeg(90, 160) for i in range(7)}
    spec = parse_sample(_raw({**frames, "txt": b"x", "json": b'{"fps": 3.5}'}), text,
                        _cfg(tok_dir, video_min_pixels=56 * 56, video_max_pixels=100 * 100, max_video_frames=5))
    (video,) = spec.media
    assert len(video.frames) == 4  # min(7, 5) rounded down to even
    assert video.resized == smart_resize(90, 160, min_pixels=56 * 56, max_pixels=100 * 100)
    assert video.grid == (2, video.resized[0] // 14, video.resized[1] // 14)
    # 4 of 7 frames at 3.5 fps -> 2 fps sampled -> one temporal patch (2 frames) spans 1 s
    assert video.second_per_grid == pytest.approx(1.0)


def test_all_bad_data_stops_instead_of_spinning(tok_dir, tmp_path):
    write_shard(str(tmp_path / "bad.tar"), [(f"s{i}", {"jpg": b"junk", "txt": b"x"}) for i in range(3)])
    cfg = DataConfig(data_path=str(tmp_path), tokenizer_dir=tok_dir, prefetch=0)
    from mllm_mega.data.loader import DataPipelineError

    # 3 samples per epoch, all unreadable: two epochs' worth in a row stops the loader, naming the reason
    with pytest.raises(DataPipelineError, match=r"6 samples in a row .*'image_unreadable': 6"):
        next(build_train_loader(cfg, dp_rank=0, dp_size=1))


def test_conversation_the_template_cannot_render(text, tok_dir):
    # an assistant turn first: the template's default system turn breaks prefix rendering
    conv = {"conversations": [{"from": "gpt", "value": "two"}, {"from": "human", "value": "ok"},
                              {"from": "gpt", "value": "three"}]}
    with pytest.raises(BadSample) as exc:
        parse_sample(_raw({"json": json.dumps(conv).encode()}), text, _cfg(tok_dir))
    assert exc.value.reason == "json_malformed"
