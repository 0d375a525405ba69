"""Weighted mixtures (data.datasets): the blend ratio, exact resume, per-dataset counts, epochs, config errors."""
import json
import os

import pytest
import torch

from mllm_mega.config import config_from_flat
from mllm_mega.data import synthetic
from mllm_mega.data.config import DataConfig
from mllm_mega.data.loader import build_train_loader
from mllm_mega.data.mixture import BlendedStream
from mllm_mega.data.shards import iter_shard, list_shards, write_shard


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    synthetic.make_dataset(str(root / "a"), 24, seed=3, num_eval=0, samples_per_shard=8, multi_image_frac=0.0)
    os.makedirs(root / "b")
    for s in range(2):  # dataset b: 8 samples keyed b000.., same tokenizer
        write_shard(str(root / "b" / f"shard-{s:06d}.tar"),
                    [(f"b{i:03d}", synthetic.make_sample(i, 4, multi_image_frac=0.0)[1]) for i in range(4 * s, 4 * s + 4)])
    return root


def _cfg(root, **kw):
    base = dict(datasets=[{"path": str(root / "a" / "train"), "weight": 3, "name": "a"},
                          {"path": str(root / "b"), "weight": 1, "name": "b"}],
                tokenizer_dir=str(root / "a" / "tokenizer"), seq_len=256, buffer_size=16, jpeg_prob=0.0,
                decoder="pil", num_workers=1, prefetch=0, seed=7)
    base.update(kw)
    return DataConfig(**base)


def _dataset_of_key(key):  # independent of the loader: b's keys start with "b", a's with "train"
    return "b" if key.startswith("b") else "a"


class _Counter:
    """A stand-in stream: ``limit`` items, then exhausted."""

    def __init__(self, limit=None):
        self.limit, self.n, self.samples_per_epoch = limit, 0, None

    def next(self):
        if self.limit is not None and self.n >= self.limit:
            return None
        self.n += 1
        return self, 0

    def position(self):
        return {"n": self.n}

    def set_position(self, pos):
        self.n = pos["n"]


def _choices(blend, num):
    return [blend.streams.index(blend.next()[0]) for _ in range(num)]


def test_blend_counts_stay_within_half_a_sample_of_the_weights():
    for weights in ([3, 1], [1, 1], [0.9, 0.1], [1, 7], [0.37, 0.63]):
        blend = BlendedStream([_Counter(), _Counter()], weights, ["x", "y"])
        share = weights[0] / sum(weights)
        for n in range(1, 400):
            blend.next()
            assert abs(blend.counts[0] - share * n) <= 0.5 + 1e-9, (weights, n, blend.counts)
    # a finite dataset drops out and the other goes on alone
    blend = BlendedStream([_Counter(), _Counter(limit=2)], [1, 3], ["x", "y"])
    for _ in range(10):
        blend.next()
    assert blend.counts == [8, 2]
    # resume mid-period (7 draws of a 3:1 blend): the same choices follow
    blend = BlendedStream([_Counter(), _Counter()], [3, 1], ["x", "y"])
    _choices(blend, 7)
    state = json.loads(json.dumps(blend.position()))
    want = _choices(blend, 20)
    resumed = BlendedStream([_Counter(), _Counter()], [3, 1], ["x", "y"])
    resumed.set_position(state)
    assert _choices(resumed, 20) == want and resumed.counts == blend.counts


def test_mixture_ratio_counts_and_exact_resume(two_datasets):
    loader = build_train_loader(_cfg(two_datasets), dp_rank=0, dp_size=1)
    first = [next(loader) for _ in range(3)]
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [next(loader) for _ in range(5)]
    keys = [k for b in first + expected for k in b["sample_keys"]]
    handed = {"a": 0, "b": 0}
    for k in keys:
        handed[_dataset_of_key(k)] += 1
    assert loader.stats["per_dataset"] == handed and sum(handed.values()) == loader.stats["samples"]
    assert loader.skip_counts == {}, "clean data: every draw reaches a batch or waits in the buffer"
    # draws = handed out + still waiting (buffer, ready packs); the blend puts 3 of every 4 draws into a
    # (counts within one sample of 3/4 of the draws, test above); both datasets have repeated by now
    end = loader.state_dict()
    pending = {"a": 0, "b": 0}
    for _, restore_key in end["buffer"] + [e for p in end["ready"] for e in p]:
        pending["b" if os.path.dirname(restore_key[0]).endswith("b") else "a"] += 1
    draws = {d: handed[d] + pending[d] for d in handed}
    assert abs(draws["a"] - 0.75 * sum(draws.values())) <= 1, (handed, pending)
    assert all(s["epoch"] >= 1 for s in end["stream"]["streams"])
    # a fresh loader (prefetching this time) continues bit-identically
    resumed = build_train_loader(_cfg(two_datasets, prefetch=2), dp_rank=0, dp_size=1)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert got["sample_keys"] == want["sample_keys"]
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[name], value), name
    resumed.close()  # the prefetch thread has run ahead: the stats must still be those of the batches handed out
    assert resumed.stats == loader.stats
    with pytest.raises(ValueError, match="datasets"):  # a state of another mixture is refused
        build_train_loader(_cfg(two_datasets, datasets=[{"path": str(two_datasets / "a" / "train"), "name": "a"},
                                                        {"path": str(two_datasets / "b"), "name": "b"}]),
                           dp_rank=0, dp_size=1).load_state_dict(state)


def test_one_epoch_reads_each_dataset_once_per_rank_split(two_datasets):
    cfg = _cfg(two_datasets, epochs=1)
    everything = [raw.key for d in ("a/train", "b") for s in list_shards(str(two_datasets / d))
                  for raw, _ in iter_shard(s)]
    ranks = []
    for r in range(2):
        loader = build_train_loader(cfg, dp_rank=r, dp_size=2)
        ranks.append([k for batch in loader for k in batch["sample_keys"]])
        assert sorted(loader.stats["per_dataset"].items()) == [("a", sum(not k.startswith("b") for k in ranks[-1])),
                                                               ("b", sum(k.startswith("b") for k in ranks[-1]))]
    assert sorted(ranks[0] + ranks[1]) == sorted(everything)  # each sample exactly once over the two ranks
    assert all(any(k.startswith("b") for k in keys) for keys in ranks)  # each rank reads its own b shard


def test_mixture_config_errors_name_the_entry(two_datasets, tmp_path):
    a, b = str(two_datasets / "a" / "train"), str(two_datasets / "b")
    cases = [
        ([{"path": a, "weight": 0}], r"datasets\[0\]: weight must be a number > 0"),
        ([{"path": a, "name": "x"}, {"path": b, "weight": -1, "name": "y"}], r"datasets\[1\]: weight"),
        ([{"path": a, "name": "x"}, {"path": b, "name": "x"}], r"datasets\[1\]: name 'x' is already used by datasets\[0\]"),
        ([{"path": a}, {"path": str(tmp_path / "nope")}], r"datasets\[1\]: path .*nope' does not exist"),
        ([{"path": a, "wieght": 2}], r"datasets\[0\]: unknown key 'wieght'; did you mean 'weight'"),
        ([], "non-empty list"),
    ]
    for datasets, message in cases:
        with pytest.raises(ValueError, match=message):
            DataConfig(datasets=datasets)
    with pytest.raises(ValueError, match="either data_path or datasets"):
        DataConfig(data_path=a, datasets=[{"path": a}])
    # defaults: weight 1, name = the path's basename
    assert DataConfig(datasets=[{"path": b}]).datasets == [{"path": b, "weight": 1.0, "name": "b"}]
    # the run config's synthetic defaults leave a mixture alone (no data_path added beside it)
    cfg = config_from_flat({"data.datasets": [{"path": a, "name": "a"}], "synthetic.dir": str(tmp_path / "s")})
    assert cfg.data.data_path == "" and cfg.data.datasets[0]["name"] == "a"
    with pytest.raises(ValueError, match="'again' and 'a' both hold the shard"):
        build_train_loader(_cfg(two_datasets, datasets=[{"path": a, "name": "a"},
                                                        {"path": os.path.join(a, "*.tar"), "name": "again"}]),
                           dp_rank=0, dp_size=1)
