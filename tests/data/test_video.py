"""Video files (mp4) through the loader: HF frame sampling rule, pixels, grids and time per temporal patch."""
import io
import math

import numpy as np
import pytest
import torch

from mllm_mega.data import synthetic
from mllm_mega.data import video as vid
from mllm_mega.data.config import DataConfig
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.shards import write_shard
from mllm_mega.data.vision import BadSample, resize_pil, smart_resize, video_to_patches

av = pytest.importorskip("av")


def _mp4(num_frames, fps, width=64, height=48, seed=0):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.clip(rng.integers(0, 40, (height, width, 3)) + i * 9, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _hf_fps_rule(total, fps, sample_fps, max_frames, min_frames=4, temporal=2):
    """transformers' Qwen2VLVideoProcessor.sample_frames with an fps target, restated."""
    max_frames = math.floor(min(max_frames, total) / temporal) * temporal
    num = total / fps * sample_fps
    num = min(max(num, min_frames), max_frames, total)
    num = math.floor(num / temporal) * temporal
    return torch.arange(0, total, total / num).int().numpy()


def test_sampling_rule_matches_hf():
    for total, fps, sample_fps, cap in [(25, 10, 2, 16), (300, 30, 2, 16), (300, 30, 2, 768), (9, 3, 2, 8),
                                        (40, 24, 1, 6), (100, 25, 4, 64)]:
        np.testing.assert_array_equal(vid.sample_indices(total, fps, sample_fps, cap),
                                      _hf_fps_rule(total, fps, sample_fps, cap))


def test_header_and_decode():
    data = _mp4(25, 10)
    info = vid.inspect_video(data)
    assert (info.height, info.width, info.num_frames, info.fps) == (48, 64, 25, 10.0)
    frames = vid.decode_frames(data, [0, 6, 24])
    assert frames.shape == (3, 48, 64, 3)
    with pytest.raises(BadSample) as exc:
        vid.inspect_video(data[: len(data) // 3])
    assert exc.value.reason == "video_error"
    with pytest.raises(BadSample) as exc:
        vid.decode_frames(data, [30])
    assert exc.value.reason == "video_error"


def test_mp4_sample_through_the_loader(tmp_path):
    synthetic.make_dataset(str(tmp_path / "d"), 4, seed=0, num_eval=0)
    data = _mp4(25, 10, seed=1)
    write_shard(str(tmp_path / "v.tar"), [
        ("clip", {"mp4": data, "txt": b"a red circle moving right"}),
        ("broken", {"mp4": data[: len(data) // 3], "txt": b"a red circle"}),
    ])
    cfg = DataConfig(data_path=str(tmp_path / "v.tar"), tokenizer_dir=str(tmp_path / "d" / "tokenizer"),
                     seq_len=256, epochs=1, jpeg_prob=0.0, video_min_pixels=56 * 56, video_max_pixels=112 * 112)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, tokens_per_second=2)
    (batch,) = list(loader)
    assert loader.skip_counts == {"video_error": 1}
    keep = _hf_fps_rule(25, 10, 2.0, cfg.max_video_frames)  # 25 frames at 10 fps, 2 fps wanted: 4 frames
    h, w = smart_resize(48, 64, min_pixels=cfg.video_min_pixels, max_pixels=cfg.video_max_pixels)
    with av.open(io.BytesIO(data)) as container:
        all_frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    ref, grid = video_to_patches(np.stack([resize_pil(all_frames[i], h, w) for i in keep]))
    torch.testing.assert_close(batch["pixel_values_videos"], torch.from_numpy(ref), rtol=0, atol=0)
    assert batch["video_grid_thw"].tolist() == [list(grid)] and grid[0] == len(keep) // 2
    # 4 of 25 frames of a 2.5 s clip: 1.6 sampled frames/s, 2 frames per temporal patch -> 1.25 s
    assert batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / (10 * len(keep) / 25))]
    assert batch["pixel_values"].shape == (0, 1176) and batch["num_videos"] == 1


def test_without_pyav_videos_are_skipped_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(vid, "HAVE_AV", False)
    with pytest.raises(BadSample) as exc:
        vid.inspect_video(_mp4(4, 2))
    assert exc.value.reason == "video_unsupported"
