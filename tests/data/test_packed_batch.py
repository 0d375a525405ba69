"""A packed micro-batch equals the unpacked computation of the same samples.

For every sample of a pack, processed alone: pixel values from transformers' Qwen2-VL image processor,
MRoPE positions from transformers' Qwen2_5_VLModel.get_rope_index, labels from the plain causal shift,
loss weights and losses from per-sample averages, attention outputs from attention over the sample alone.
"""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.samples import parse_sample
from mllm_mega.data.shards import iter_shard, list_shards
from mllm_mega.data.text import IMAGE, VIDEO, TextProcessor
from mllm_mega.data.vision import decode_image_pil, resize_pil, video_to_patches

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402

SEQ_LEN = 384
TOKENS_PER_SECOND = 2  # Qwen2.5-VL's vision_config.tokens_per_second


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    synthetic.make_dataset(str(out), 90, seed=3, num_eval=0, samples_per_shard=30, multi_image_frac=0.15,
                           video_frac=0.15)
    return out


def _cfg(dataset, mode):
    return DataConfig(data_path=str(dataset / "train"), tokenizer_dir=str(dataset / "tokenizer"), seq_len=SEQ_LEN,
                      buffer_size=40, jpeg_prob=0.0, loss_reweighting=mode, video_min_pixels=56 * 56,
                      video_max_pixels=112 * 112, max_images_per_pack=12, num_workers=2)


def _hf_rope_index(ids, types_, image_grids, video_grids, seconds):
    """transformers' get_rope_index needs only config values from its model; give it just those."""
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=TOKENS_PER_SECOND)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(fake, *a, **k)
    pos, _ = Qwen2_5_VLModel.get_rope_index(
        fake, torch.as_tensor(ids)[None], torch.as_tensor(types_)[None],
        image_grid_thw=torch.tensor(image_grids).reshape(-1, 3) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids).reshape(-1, 3) if video_grids else None,
        second_per_grid_ts=torch.tensor(seconds) if seconds else None)
    return pos[:, 0]


def _block_causal_attention(q, k, v, cu):
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    n = len(seg)
    mask = (seg[:, None] == seg[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_pack_equals_unpacked(dataset, mode):
    cfg = _cfg(dataset, mode)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, tokens_per_second=TOKENS_PER_SECOND)
    text = TextProcessor(cfg.tokenizer_dir)
    raw_by_key = {raw.key: raw for shard in list_shards(cfg.data_path) for raw, _ in iter_shard(shard)}
    hf_proc = hf_pil.Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    seen_video = seen_multi = False
    for _ in range(3 if mode != "token" else 5):
        batch = next(loader)
        T = SEQ_LEN
        assert batch["input_ids"].shape == (T,) and batch["position_ids"].shape == (3, T)
        cu = batch["cu_seqlens"]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == T
        real = batch["num_real_tokens"]
        assert int(cu[batch["num_samples"]]) == real
        if real < T:  # padding is its own last segment
            assert len(cu) == batch["num_samples"] + 2
        assert batch["max_seqlen"] == int((cu[1:] - cu[:-1]).max())

        logits = torch.randn(T, text.vocab_size, generator=torch.Generator().manual_seed(0))
        ce = F.cross_entropy(logits, batch["labels"], ignore_index=-100, reduction="none")
        w = batch["loss_weights"]
        packed_loss = (w * ce).sum() / w.sum()
        num, den = 0.0, 0.0
        q = torch.randn(1, 2, T, 8, generator=torch.Generator().manual_seed(1))
        k, v = torch.randn_like(q), torch.randn_like(q)
        packed_attn = _block_causal_attention(q, k, v, cu)
        pixels, grids, vpixels, vgrids = [], [], [], []
        for s, key in enumerate(batch["sample_keys"]):
            a, b = int(cu[s]), int(cu[s + 1])
            spec = parse_sample(raw_by_key[key], text, cfg)
            ids = torch.from_numpy(spec.input_ids)
            torch.testing.assert_close(batch["input_ids"][a:b], ids, rtol=0, atol=0)
            # labels: the usual causal shift of the supervised targets
            targets = torch.where(torch.from_numpy(spec.supervised), ids, torch.full_like(ids, -100))
            expected = torch.cat([targets[1:], torch.tensor([-100])])
            torch.testing.assert_close(batch["labels"][a:b], expected, rtol=0, atol=0)
            n = int((expected != -100).sum())
            assert n > 0
            weight = {"token": 1.0, "sample": 1.0 / n, "square": n ** -0.5}[mode]
            torch.testing.assert_close(w[a:b], (expected != -100).float() * weight, rtol=1e-6, atol=0)
            # per-sample loss, averaged the InternVL2.5 way: sum_s n_s * w_s * mean_s / sum_s n_s * w_s
            sample_mean = ce[a:b][expected != -100].mean()
            num, den = num + n * weight * sample_mean, den + n * weight
            # MRoPE positions restart per sample and equal HF's for the sample alone
            imgs = [m for m in spec.media if m.kind == IMAGE]
            vids = [m for m in spec.media if m.kind == VIDEO]
            ref_pos = _hf_rope_index(ids, spec.token_types, [m.grid for m in imgs], [m.grid for m in vids],
                                     [m.second_per_grid for m in vids])
            torch.testing.assert_close(batch["position_ids"][:, a:b], ref_pos, rtol=0, atol=0)
            # attention over the sample alone
            alone = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
            torch.testing.assert_close(packed_attn[:, :, a:b], alone, rtol=1e-5, atol=1e-6)
            if imgs:
                ref = hf_proc(images=[decode_image_pil(m.frames[0]) for m in imgs], return_tensors="pt")
                pixels.append(ref["pixel_values"])
                grids.append(ref["image_grid_thw"])
            for m in vids:
                frames = np.stack([resize_pil(decode_image_pil(f), *m.resized) for f in m.frames])
                patches, grid = video_to_patches(frames)
                vpixels.append(torch.from_numpy(patches))
                vgrids.append(torch.tensor([grid]))
            seen_video |= bool(vids)
            seen_multi |= len(imgs) > 1
        torch.testing.assert_close(packed_loss, num / den, rtol=1e-5, atol=1e-6)
        assert (batch["labels"][real:] == -100).all() and (batch["position_ids"][:, real:] == 0).all()
        assert (w[real:] == 0).all()
        ref_pixels = torch.cat(pixels) if pixels else torch.zeros(0, 1176)
        torch.testing.assert_close(batch["pixel_values"], ref_pixels, rtol=0, atol=0)
        torch.testing.assert_close(batch["image_grid_thw"], torch.cat(grids) if grids else torch.zeros(0, 3,
                                   dtype=torch.int64), rtol=0, atol=0)
        assert batch["num_images"] == len(batch["image_grid_thw"]) <= cfg.max_images_per_pack
        if vpixels:
            torch.testing.assert_close(batch["pixel_values_videos"], torch.cat(vpixels), rtol=0, atol=0)
            torch.testing.assert_close(batch["video_grid_thw"], torch.cat(vgrids), rtol=0, atol=0)
        else:
            assert batch["pixel_values_videos"].shape == (0, 1176)
        # the vision tower's input matches the placeholder count
        merged = (batch["image_grid_thw"].prod(-1) // 4).sum()
        assert int((batch["input_ids"] == text.image_token_id).sum()) == int(merged)
    if mode == "token":
        assert seen_video and seen_multi, "the test data should exercise videos and multi-image samples"
