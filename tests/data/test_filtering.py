"""tools/filter_dataset.py: planted bad samples dropped by the right rule, kept samples copied byte for byte,
the score filter's selection exact with planted scores, and a tiny random CLIP model through the CLI."""
import io
import json
import os
import random

import numpy as np
import pytest
from PIL import Image

from mllm_mega.data.filtering import FilterConfig, NearDuplicateIndex, dhash, filter_dataset, ngram_repetition
from mllm_mega.data.shards import iter_shard, list_shards, write_shard
from tests.conftest import run_cmd


def _photo(seed, h=64, w=80, quality=92):
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.05, 0.3, 4)
    img = np.stack([np.sin(f[0] * x + f[1] * y), np.cos(f[2] * x - f[3] * y), np.sin(f[0] * y)], -1)
    img = ((img + 1) * 127.5 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


CAPTIONS = ["two red circles on the left", "a blue square above a green triangle", "three yellow stars",
            "one purple circle in the middle", "a small orange square at the top", "four green dots in a row"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Six good samples and one planted case per rule, with the reason each must get."""
    root = tmp_path_factory.mktemp("filter")
    good = [(f"good{i}", {"jpg": _photo(i), "txt": CAPTIONS[i].encode()}) for i in range(6)]
    bad = {
        "rep": ({"jpg": _photo(10), "txt": b"the cat sat the cat sat the cat sat the cat sat the cat sat"},
                "repetitive_text"),
        "short": ({"jpg": _photo(11), "txt": b"cat"}, "text_too_short"),
        "long": ({"jpg": _photo(12), "txt": " ".join(f"w{i}" for i in range(60)).encode()}, "text_too_long"),
        "tiny": ({"jpg": _photo(13, 8, 8), "txt": b"a very small picture here"}, "image_too_small"),
        "thin": ({"png": _png(4, 900), "txt": b"a very thin picture here"}, "image_aspect_ratio"),
        "dup": ({"jpg": good[0][1]["jpg"], "txt": b"the same picture again here"}, "duplicate_image"),
        # the same picture re-encoded at another quality: other bytes, (almost) the same dHash
        "near": ({"jpg": _reencode(good[1][1]["jpg"], 60), "txt": b"nearly the same picture here"},
                 "near_duplicate_image"),
        "notext": ({"jpg": _photo(14)}, "unreadable_sample"),
    }
    samples = good[:3] + [(k, f) for k, (f, _) in bad.items()] + good[3:]
    os.makedirs(root / "in")
    write_shard(str(root / "in" / "a.tar"), samples[:7])
    write_shard(str(root / "in" / "b.tar"), samples[7:])
    return {"dir": str(root / "in"), "good": dict(good), "expected": {k: r for k, (_, r) in bad.items()}}


def _png(h, w):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _reencode(jpeg, quality):
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _kept(out):
    return {raw.key: raw.fields for shard in list_shards(out) for raw, _ in iter_shard(shard)}


def test_rules_drop_exactly_the_planted_samples(planted, tmp_path):
    out = str(tmp_path / "out")
    cfg = FilterConfig(min_words=2, max_words=40, max_ngram_repeat=0.5, phash_distance=4)
    report = filter_dataset(planted["dir"], out, cfg, progress=False)
    kept = _kept(out)
    assert sorted(kept) == sorted(planted["good"])
    for key, fields in kept.items():  # byte for byte
        assert fields == planted["good"][key]
    reasons = {key: reason for _, key, reason in report["dropped_samples"]}
    assert reasons == planted["expected"]
    expected_counts = {}
    for reason in planted["expected"].values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert report["dropped"] == expected_counts and report["kept"] == 6 and report["input_samples"] == 14
    assert json.load(open(os.path.join(out, "report.json")))["dropped"] == expected_counts
    assert sorted(os.listdir(out)) == ["a.tar", "b.tar", "report.json"]
    # disabling a rule keeps its planted sample
    report = filter_dataset(planted["dir"], str(tmp_path / "out2"),
                            FilterConfig(min_words=2, max_words=40, max_ngram_repeat=None), progress=False)
    assert "rep" in _kept(str(tmp_path / "out2")) and "repetitive_text" not in report["dropped"]


def test_ngram_repetition_and_near_duplicate_index_against_brute_force():
    assert ngram_repetition("a b c a b c", 3) == 1 - 3 / 4  # grams abc bca cab abc: 3 unique of 4
    assert ngram_repetition("one two three four", 3) == 0.0 and ngram_repetition("too short", 3) == 0.0
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(40)]
    probes = [b ^ sum(1 << rng.randrange(64) for _ in range(rng.randrange(8))) for b in base] + \
             [rng.getrandbits(64) for _ in range(40)]
    for distance in (0, 3, 5):
        index = NearDuplicateIndex(distance)
        for h in base:
            index.add(h)
        for p in probes:
            assert index.near(p) == any(bin(p ^ b).count("1") <= distance for b in base), (distance, p)


def test_dhash_sees_reencoding_not_other_pictures():
    a = _photo(1)
    assert bin(dhash(a) ^ dhash(_reencode(a, 60))).count("1") <= 4
    assert min(bin(dhash(a) ^ dhash(_photo(s))).count("1") for s in range(2, 8)) > 8


def test_score_selection_with_planted_scores(planted, tmp_path):
    """Mismatched pairs get low planted scores: min_score and keep_top drop exactly those."""
    mismatched = {"good1", "good4"}

    def scorer(images, texts):
        by_text = {v["txt"].decode(): k for k, v in planted["good"].items()}
        return [0.05 if by_text.get(t) in mismatched else 0.3 + 0.01 * len(t) for t in texts]

    rules = dict(min_words=2, max_words=40)
    report = filter_dataset(planted["dir"], str(tmp_path / "a"), FilterConfig(**rules, score_model="x", min_score=0.1),
                            scorer=scorer, progress=False)
    assert sorted(_kept(str(tmp_path / "a"))) == sorted(set(planted["good"]) - mismatched)
    assert report["dropped"]["low_score"] == 2 and report["score"]["scored"] == 6
    filter_dataset(planted["dir"], str(tmp_path / "b"), FilterConfig(**rules, score_model="x", keep_top=0.5),
                   scorer=scorer, progress=False)
    # the top 3 of the 6 scored by planted score: 0.3 + 0.01 * caption length
    top = sorted((k for k in planted["good"] if k not in mismatched),
                 key=lambda k: -len(planted["good"][k]["txt"]))[:3]
    assert sorted(_kept(str(tmp_path / "b"))) == sorted(top)


def test_cli_with_a_tiny_random_clip(planted, tmp_path):
    import transformers

    clip = tmp_path / "clip"
    from mllm_mega.data import synthetic

    synthetic.make_dataset(str(tmp_path / "tok"), 2, seed=0, num_eval=1, samples_per_shard=2)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer"))
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(str(clip))
    tok.save_pretrained(str(clip))
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(clip))
    # the model path in-process (a subprocess would re-import torch and transformers: tens of seconds)
    report = filter_dataset(planted["dir"], str(tmp_path / "scored"),
                            FilterConfig(min_words=2, max_words=40, score_model=str(clip), keep_top=0.5, device="cpu"),
                            progress=False)
    assert report["score"]["scored"] == 6 and report["kept"] == 3 and report["dropped"]["low_score"] == 3
    assert -1.0 <= report["score"]["min"] <= report["score"]["max"] <= 1.0


def test_cli_rules_and_refusals(planted, tmp_path):
    out = str(tmp_path / "out")
    res = run_cmd(["tools/filter_dataset.py", "--data", planted["dir"], "--out", out, "--min-words", "2",
                   "--max-words", "40"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["kept"] == 6 and sum(summary["dropped"].values()) == 8
    # a non-empty --out is refused without touching it; a score threshold without a model is refused
    res = run_cmd(["tools/filter_dataset.py", "--data", planted["dir"], "--out", out])
    assert res.returncode == 2 and "not an empty directory" in res.stderr
    assert len(_kept(out)) == 6
    res = run_cmd(["tools/filter_dataset.py", "--data", planted["dir"], "--out", str(tmp_path / "o2"),
                   "--min-score", "0.2"])
    assert res.returncode == 2 and "need score_model" in res.stderr and not os.path.exists(tmp_path / "o2")


def test_preference_pairs_are_judged_by_their_chosen_completion(tmp_path):
    """A pair's text is its chosen completion (string or one assistant message), not its prompt or rejected."""
    def pair(seed, chosen, rejected="no", prompt="<image>\nDescribe the image in a few words please."):
        meta = {"messages": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}
        return {"jpg": _photo(seed), "json": json.dumps(meta).encode()}

    samples = {
        "good": pair(0, "two red circles on the left"),
        "good_msg": pair(1, [{"role": "assistant", "content": "a blue square above a green triangle"}]),
        "short_chosen": pair(2, "cat", rejected="a long rejected answer with many words in it"),
        "rep_chosen": pair(3, "the cat sat the cat sat the cat sat the cat sat"),
        "empty_chosen": pair(4, "  "),
    }
    os.makedirs(tmp_path / "in")
    write_shard(str(tmp_path / "in" / "a.tar"), list(samples.items()))
    report = filter_dataset(str(tmp_path / "in"), str(tmp_path / "out"),
                            FilterConfig(min_words=2, max_words=40, max_ngram_repeat=0.5), progress=False)
    assert sorted(_kept(str(tmp_path / "out"))) == ["good", "good_msg"]
    assert {k: r for _, k, r in report["dropped_samples"]} == {
        "short_chosen": "text_too_short", "rep_chosen": "repetitive_text", "empty_chosen": "unreadable_sample"}
