"""Preference pairs (data/preference.py): token layout, packs of pairs, shared media, resume, bad pairs,
concat_packs, and the model's embedding with a feature index (ViT once per pair)."""
import json

import numpy as np
import pytest
import torch

from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.preference import PAIR_REASONS, parse_preference_sample
from mllm_mega.data.samples import SKIP_REASONS
from mllm_mega.data.shards import iter_shard, list_shards, write_shard
from mllm_mega.data.text import TextProcessor
from mllm_mega.training.step import concat_packs

SEQ = 256
VIDEO_PIXELS = (56 * 56, 112 * 112)  # small video frames: a few dozen tokens per video
IM_END = "<|im_end|>"


def _pair(key, jpg, chosen="two red circles on the left", rejected="two blue circles on the left", **extra):
    meta = {"messages": [{"role": "user", "content": "<image>\nDescribe the image."}], **extra}
    if chosen is not None:
        meta["chosen"] = chosen
    if rejected is not None:
        meta["rejected"] = rejected
    return key, {"jpg": jpg, "json": json.dumps(meta).encode()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """18 synthetic pairs (two shards) plus a shard of a multi-turn pair, a video pair and 6 bad pairs."""
    out = tmp_path_factory.mktemp("prefs")
    from tools.make_synthetic_dataset import main

    main(["--out", str(out), "--num", "18", "--seed", "7", "--num-eval", "2", "--samples-per-shard", "9",
          "--preference"])
    jpg = next(iter_shard(list_shards(str(out / "train"))[0]))[0].fields["jpg"]
    multi = [{"from": "human", "value": "<image>\nHow many shapes?"}, {"from": "gpt", "value": "two"},
             {"from": "human", "value": "Describe the image."}]
    video = {k: v for k, v in synthetic._video_sample(np.random.default_rng(0), (56, 112)).items()
             if k.startswith("video.")}
    samples = [
        ("video", {**video, "json": json.dumps({
            "messages": [{"role": "user", "content": "<video>\nWhat moves?"}], "fps": 2.0,
            "chosen": "a red circle moving up", "rejected": "a red circle moving down"}).encode()}),
        ("multi", {"jpg": jpg, "json": json.dumps({"conversations": multi, "chosen": "two red circles",
                                                     "rejected": [{"role": "assistant", "content": "one"}]}).encode()}),
        _pair("no_rejected", jpg, rejected=None),
        _pair("empty_chosen", jpg, chosen="  "),
        _pair("identical", jpg, rejected="two red circles on the left"),
        _pair("too_long", jpg, chosen="red " * 120, rejected="blue " * 120),
        ("sft", {"jpg": jpg, "txt": b"two red circles"}),
        ("ends_with_answer", {"jpg": jpg, "json": json.dumps({"conversations": multi[:2], "chosen": "a",
                                                               "rejected": "b"}).encode()}),
    ]
    write_shard(str(out / "train" / "shard-000009.tar"), samples)
    (out / "check.yaml").write_text(f"video_min_pixels: {VIDEO_PIXELS[0]}\nvideo_max_pixels: {VIDEO_PIXELS[1]}\n")
    return out


def _cfg(dataset, **kw):
    base = dict(data_path=str(dataset / "train"), tokenizer_dir=str(dataset / "tokenizer"), seq_len=SEQ,
                buffer_size=10, min_pack_fill=0.5, preference=True, decoder="pil", num_workers=1, seed=3,
                jpeg_prob=0.5, video_min_pixels=VIDEO_PIXELS[0], video_max_pixels=VIDEO_PIXELS[1])
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def epoch(dataset):
    """One epoch of packs (prefetch off) and the loader's skip counts."""
    loader = build_train_loader(_cfg(dataset, epochs=1, prefetch=0), dp_rank=0, dp_size=1)
    packs = list(loader)
    return packs, loader.skip_counts


@pytest.fixture(scope="module")
def raw_pairs(dataset):
    return {raw.key: json.loads(raw.fields["json"]) for shard in list_shards(str(dataset / "train"))
            for raw, _ in iter_shard(shard) if "json" in raw.fields}


@pytest.fixture(scope="module")
def tok(dataset):
    return TextProcessor(str(dataset / "tokenizer"))


def _completion(c):
    return c if isinstance(c, str) else c[0]["content"]


def test_parse_pair_token_layout(dataset, tok):
    raw = next(r for r, _ in iter_shard(str(dataset / "train" / "shard-000009.tar")) if r.key == "multi")
    spec = parse_preference_sample(raw, tok, _cfg(dataset))
    (c, r) = spec.segments()
    assert spec.length == c.length + r.length and spec.num_media == 1
    # the prompt, rendered by the tokenizer's own chat template (vision block collapsed to one pad)
    messages = [{"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>\nHow many shapes?"},
                {"role": "assistant", "content": "two"}, {"role": "user", "content": "Describe the image."}]
    prompt = tok.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for seg, completion in ((c, "two red circles"), (r, "one")):
        n = len(tok.tokenizer(completion + IM_END, add_special_tokens=False)["input_ids"])
        start = len(seg.input_ids) - 1 - n  # the template's "\n" after <|im_end|> ends the segment
        text = tok.tokenizer.decode(seg.input_ids[:start]).replace("<|image_pad|>", "")
        assert text == prompt.replace("<|image_pad|>", "")
        # exactly the final completion is supervised: not the prompt's assistant turn "two"
        assert seg.supervised.nonzero()[0].tolist() == list(range(start, start + n))
        assert tok.tokenizer.decode(seg.input_ids[seg.supervised]) == completion + IM_END
    assert (c.input_ids[:start] == r.input_ids[:start]).all() and (c.token_types[:start] == r.token_types[:start]).all()


def test_bad_pairs_counted_with_reasons(dataset, epoch, capsys):
    assert "preference: true" in (dataset / "data.yaml").read_text()  # what --preference writes for --config
    packs, skips = epoch
    expected = {"pair_missing": 2, "pair_empty": 1, "pair_identical": 1, "pair_too_long": 1, "json_malformed": 1}
    assert skips == expected and set(PAIR_REASONS) <= set(SKIP_REASONS)  # each reason documented
    from tools.check_dataset import main

    main(["--config", str(dataset / "check.yaml"), "--data", str(dataset / "train"), "--preference",
          "--decoder", "pil", "--seq-len", str(SEQ)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == expected and summary["samples_ok"] == 20 and summary["preference"] is True


def test_packs_of_pairs(epoch, raw_pairs, tok):
    packs, _ = epoch
    keys = [k for p in packs for k in p["pair_keys"]]
    good = sorted(k for k in raw_pairs if k.startswith("train")) + ["multi", "video"]
    assert sorted(keys) == sorted(good)  # every pair exactly once: never split, never duplicated
    assert max(len(p["pair_keys"]) for p in packs) >= 2
    for pack in packs:
        cu, ids, labels, w = pack["cu_seqlens"].tolist(), pack["input_ids"], pack["labels"], pack["loss_weights"]
        pairs = pack["pair_segments"].tolist()
        assert len(pairs) == len(pack["pair_keys"]) == pack["num_samples"]
        rows, index, pos, before = {}, {}, {}, {"image": 0, "video": 0}
        for kind, pv, grid, token in (("image", "pixel_values", "image_grid_thw", tok.image_token_id),
                                      ("video", "pixel_values_videos", "video_grid_thw", tok.video_token_id)):
            rows[kind] = iter((pack[grid].prod(-1) // 4).tolist())  # feature rows of each medium, pair order
            assert pack[pv].shape[0] == int(pack[grid].prod(-1).sum())  # each pair's media once
            pos[kind] = (ids == token).nonzero().squeeze(1)
            index[kind] = pack.get(f"{kind}_feature_index", torch.zeros(0, dtype=torch.int64))
            assert index[kind].shape == pos[kind].shape
        kinds = ["video" if key == "video" else "image" for key in pack["pair_keys"]]  # one medium per pair
        assert pack["num_images"] == kinds.count("image") and pack["num_videos"] == kinds.count("video")
        assert pack["second_per_grid_ts"].shape == (kinds.count("video"),)
        for (s0, s1), key, kind in zip(pairs, pack["pair_keys"], kinds):
            assert s1 == s0 + 1  # adjacent, chosen then rejected
            meta, n = raw_pairs[key], next(rows[kind])
            for seg, name, weighted in ((s0, "chosen", True), (s1, "rejected", False)):
                a, b = cu[seg], cu[seg + 1]
                sup = labels[a:b] != -100
                assert tok.tokenizer.decode(labels[a:b][sup]) == _completion(meta[name]) + IM_END
                assert (pack["position_ids"][:, a] == 0).all()  # positions restart per segment
                # token reweighting: 1 on the chosen completion, 0 on the rejected segment
                assert torch.equal(w[a:b], sup.float() if weighted else torch.zeros(b - a))
                # both segments' placeholders take the pair's own feature rows, in order
                in_seg = (pos[kind] >= a) & (pos[kind] < b)
                assert index[kind][in_seg].tolist() == list(range(before[kind], before[kind] + n))
            before[kind] += n
        assert (labels[cu[2 * len(pairs)]:] == -100).all() and w[cu[2 * len(pairs)]:].sum() == 0  # padding


def _changed_attributes(pair):
    def attributes(caption):  # "two red circles on the left" -> count, colour, kind, region
        words = caption.split()
        return {"count": words[0], "colour": words[1], "kind": words[2].rstrip("s"), "region": words[3:]}

    a, b = attributes(pair["chosen"]), attributes(pair["rejected"])
    return [k for k in a if a[k] != b[k]]


def test_synthetic_pairs_change_one_attribute(raw_pairs):
    pairs = [m for k, m in raw_pairs.items() if k.startswith("train")]
    assert {m["changed"] for m in pairs} == {"colour", "count", "kind", "region"}
    for m in pairs:
        assert _changed_attributes(m) == [m["changed"]], (m["chosen"], m["rejected"])


def test_synthetic_pairs_limited_to_chosen_attributes(tmp_path):
    from tools.make_synthetic_dataset import main

    out = tmp_path / "colour"
    main(["--out", str(out), "--num", "24", "--num-eval", "0", "--preference", "--pair-attributes", "colour"])
    pairs = [json.loads(raw.fields["json"]) for shard in list_shards(str(out / "train")) for raw, _ in iter_shard(shard)]
    assert len(pairs) == 24 and all(_changed_attributes(m) == ["colour"] == [m["changed"]] for m in pairs)
    assert json.loads((out / "meta.json").read_text())["pair_attributes"] == ["colour"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num", "2", "--preference", "--pair-attributes", "colour,color"])
    assert not (tmp_path / "bad").exists()
    from mllm_mega.config import load_config

    with pytest.raises(ValueError, match=r"synthetic.pair_attributes: .*'size'"):
        load_config(None, ["synthetic.pair_attributes=[colour,size]"])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exact_resume(dataset, prefetch):
    k, more = 2, 4
    loader = build_train_loader(_cfg(dataset, prefetch=prefetch), dp_rank=0, dp_size=1)
    for _ in range(k):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["buffer"] or state["ready"]
    expected = [next(loader) for _ in range(more)]
    resumed = build_train_loader(_cfg(dataset, prefetch=2 - prefetch), dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            same = torch.equal(got[key], want[key]) if isinstance(want[key], torch.Tensor) else got[key] == want[key]
            assert same, key
    assert resumed.skip_counts == loader.skip_counts and resumed.stats == loader.stats
    with pytest.raises(ValueError, match="preference"):  # a pair stream does not resume as SFT data
        build_train_loader(_cfg(dataset, preference=False), dp_rank=0, dp_size=1).load_state_dict(state)


def test_preference_config_validated(dataset):
    with pytest.raises(ValueError, match="preference"):
        _cfg(dataset, preference="yes")


def test_concat_packs_keeps_pairs_on_their_segments(epoch):
    packs = epoch[0]
    assert len(packs) >= 3 and any(p["num_videos"] for p in packs)
    cat = concat_packs(packs)
    cu, pos = cat["cu_seqlens"].tolist(), 0
    assert cat["pair_keys"] == [k for p in packs for k in p["pair_keys"]]
    for pack in packs:
        pcu = pack["cu_seqlens"].tolist()
        for (s0, s1), (t0, t1) in zip(pack["pair_segments"].tolist(), cat["pair_segments"][pos:].tolist()):
            for s, t in ((s0, t0), (s1, t1)):
                assert torch.equal(pack["input_ids"][pcu[s]:pcu[s + 1]], cat["input_ids"][cu[t]:cu[t + 1]])
                assert torch.equal(pack["labels"][pcu[s]:pcu[s + 1]], cat["labels"][cu[t]:cu[t + 1]])
        pos += len(pack["pair_keys"])
    assert pos == len(cat["pair_segments"])
    # every placeholder's feature row is the same row of the same medium as in its own pack
    for kind, pv, grid in (("image", "pixel_values", "image_grid_thw"),
                           ("video", "pixel_values_videos", "video_grid_thw")):
        offset, same = 0, {}
        for pack in packs:
            local = pack.get(f"{kind}_feature_index", torch.zeros(0, dtype=torch.int64))
            mine = cat[f"{kind}_feature_index"][offset:offset + len(local)]
            for row_local, row_cat in zip(local.tolist(), mine.tolist()):
                (i, r), (j, q) = _owner(pack[grid], row_local), _owner(cat[grid], row_cat)
                assert r == q
                same[(id(pack), i, j)] = (_patches(pack, i, pv, grid), _patches(cat, j, pv, grid))
            offset += len(local)
        assert offset == cat[f"{kind}_feature_index"].numel() > 0
        assert all(torch.equal(a, b) for a, b in same.values())  # once per medium: torch.equal is slow on CPU


def _owner(grids, row):
    """(medium, row within it) of a feature row (merge 2: t*h*w/4 rows per medium)."""
    for i, n in enumerate((grids.prod(-1) // 4).tolist()):
        if row < n:
            return i, row
        row -= n
    raise AssertionError("feature row past the last medium")


def _patches(pack, i, pv="pixel_values", grid="image_grid_thw"):
    start = int(pack[grid][:i].prod(-1).sum())
    return pack[pv][start:start + int(pack[grid][i].prod())]


def _shared_vs_duplicated_media(model, arch, pack, tok):
    """Run ``model`` on ``pack`` with its feature index and with every segment holding its own copy of the
    media; returns (ViT input rows of each run, embedding, logit and relative ViT-gradient differences)."""
    ids = pack["input_ids"] % 400  # text ids into the tiny vocabulary (below its special tokens)
    for ours, theirs in ((tok.image_token_id, arch.image_token_id), (tok.video_token_id, arch.video_token_id),
                         (tok.vision_start_id, arch.vision_start_token_id), (tok.vision_end_id, arch.vision_end_token_id)):
        if theirs is not None:
            ids[pack["input_ids"] == ours] = theirs
    assert len(pack["image_grid_thw"]) + len(pack["video_grid_thw"]) == len(pack["pair_keys"]) >= 2  # one medium a pair
    shared, dup = {}, {}
    for pv, grid_key, index_key in (("pixel_values", "image_grid_thw", "image_feature_index"),
                                    ("pixel_values_videos", "video_grid_thw", "video_feature_index")):
        grid = pack[grid_key]
        if len(grid):  # each pair's medium once + the index, or a copy in the chosen and in the rejected segment
            shared.update({pv: pack[pv], grid_key: grid, index_key: pack[index_key]})
            dup.update({pv: torch.cat([_patches(pack, i, pv, grid_key) for i in range(len(grid)) for _ in range(2)]),
                        grid_key: grid.repeat_interleave(2, dim=0)})
    rows, embeds, logits, grads = [], [], [], []
    hook = model.vision.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    embed = model.embed
    model.embed = lambda *a, **k: embeds.append(embed(*a, **k)) or embeds[-1]  # record the forward's embedding
    probe = torch.randn(pack["input_ids"].shape[0], arch.text.vocab_size, generator=torch.Generator().manual_seed(1))
    for kw in (shared, dup):
        model.zero_grad()
        out = model(ids, pack["position_ids"], pack["cu_seqlens"], max_seqlen=pack["max_seqlen"], **kw)
        (out * probe).sum().backward()
        logits.append(out.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.vision.parameters() if p.grad is not None]))
    hook.remove()
    del model.embed
    assert grads[1].abs().max() > 0
    with pytest.raises(ValueError, match="context parallel"):
        model.embed(ids, context_parallel=object(), **shared)
    return (rows, (embeds[0] - embeds[1]).abs().max().item(), (logits[0] - logits[1]).abs().max().item(),
            ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item())


def test_model_shares_vit_features_across_a_pairs_segments(epoch, tok):
    """Tiny Qwen2.5-VL (TP1, in-process): the pack with its feature index gives the embeddings, logits and
    ViT gradients of the same pack with every segment holding its own copy of the media, with the ViT run
    once per image or video instead of twice (a pack of image pairs, and one with the video pair)."""
    from mllm_mega.models.qwen2_vl.configuration import arch_from_hf_config
    from mllm_mega.models.qwen2_vl.family import build_model
    from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict
    from mllm_mega.parallel.initialize import initialize_distributed

    initialize_distributed(1, 1)
    arch = arch_from_hf_config(tiny_hf_config_dict("qwen2_5_vl"))
    torch.manual_seed(0)
    model = build_model(arch, kernels="torch")
    images = max((p for p in epoch[0] if not p["num_videos"]), key=lambda p: len(p["pair_keys"]))
    with_video = next(p for p in epoch[0] if p["num_videos"] and len(p["pair_keys"]) >= 2)
    for pack in (images, with_video):
        rows, embed_diff, logit_diff, grad_diff = _shared_vs_duplicated_media(model, arch, pack, tok)
        n = pack["pixel_values"].shape[0] + pack["pixel_values_videos"].shape[0]
        assert rows == [n, 2 * n]  # the ViT saw each medium once, against twice for the duplicated media
        # fp32; the ViT sees the same media in a batch of another size, so at most BLAS rounding: measured
        # 0 (bitwise) for the embeddings and logits, 1.2e-7 relative for the ViT gradients (summed over 2 uses)
        print(f"embed {embed_diff:.2e} logits {logit_diff:.2e} vit grad (relative) {grad_diff:.2e}")
        assert embed_diff < 1e-6 and logit_diff < 1e-6 and grad_diff < 1e-6


def test_fixed_resolution_family_shares_vit_features_across_a_pairs_segments(dataset, tok):
    """The same for tiny Open-Qwen2VL (SigLIP, fixed 42 px images pooled to 2x2 = 4 tokens, so a medium's
    feature rows are its scheme's token count, not grid / merge**2), through the loader with the options the
    trainer gives it for that family."""
    from mllm_mega.models import registry
    from mllm_mega.parallel.initialize import initialize_distributed

    spec = registry.get("open_qwen2vl")
    arch = spec.parse_hf_config(spec.tiny_config(projector_pool_grid=2))
    cfg = _cfg(dataset, epochs=1, prefetch=0, data_path=[str(p) for p in list_shards(str(dataset / "train"))
                                                        if not p.endswith("shard-000009.tar")])
    packs = list(build_train_loader(cfg, dp_rank=0, dp_size=1, **spec.loader_options(arch)))
    pack = max(packs, key=lambda p: len(p["pair_keys"]))
    n = len(pack["pair_keys"])
    assert pack["image_feature_index"].tolist() == [r for i in range(n) for _ in range(2) for r in range(4 * i, 4 * i + 4)]
    initialize_distributed(1, 1)
    torch.manual_seed(0)
    model = spec.build_stage(arch, kernels="torch")
    rows, embed_diff, logit_diff, grad_diff = _shared_vs_duplicated_media(model, arch, pack, tok)
    assert rows == [9 * n, 18 * n]  # 3x3 patches per image: once per pair, against twice
    print(f"embed {embed_diff:.2e} logits {logit_diff:.2e} vit grad (relative) {grad_diff:.2e}")
    assert embed_diff < 1e-6 and logit_diff < 1e-6 and grad_diff < 1e-6


def test_converted_trl_pairs_load_as_pairs(dataset, tmp_path, tok):
    """tools/prepare_dataset.py --format preference (TRL rows) writes shards the preference loader reads: the
    converter's json schema and the loader's agree (a renamed key on either side fails here)."""
    from mllm_mega.data.convert import prepare_dataset

    jpg = next(iter_shard(list_shards(str(dataset / "train"))[0]))[0].fields["jpg"]
    (tmp_path / "a.jpg").write_bytes(jpg)
    rows = [{"prompt": "<image>\nWhich colour?", "chosen": "red", "rejected": "blue", "images": ["a.jpg"]},
            {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]}],
             "chosen": [{"role": "assistant", "content": "two"}], "rejected": "three", "images": ["a.jpg"]}]
    (tmp_path / "pref.json").write_text(json.dumps(rows))
    report = prepare_dataset("preference", str(tmp_path / "pref.json"), str(tmp_path / "out"))
    assert not report["bad"]
    loader = build_train_loader(_cfg(dataset, data_path=str(tmp_path / "out"), epochs=1, prefetch=0),
                                dp_rank=0, dp_size=1)
    packs = list(loader)
    assert sum(v for v in loader.skip_counts.values()) == 0
    got = []
    for pack in packs:
        cu = pack["cu_seqlens"].tolist()
        for c, r in pack["pair_segments"].tolist():
            text = [tok.tokenizer.decode([t for t in pack["labels"][cu[s]:cu[s + 1]].tolist() if t != -100])
                    for s in (c, r)]
            got.append(tuple(t.replace(IM_END, "").strip() for t in text))
        assert pack["num_images"] == pack["pair_segments"].shape[0]  # one image per pair, stored once
    assert sorted(got) == [("red", "blue"), ("two", "three")]
