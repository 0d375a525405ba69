"""Weighted dataset mixtures (``data.datasets``): several shard sets blended into one deterministic stream.

The blend is Megatron's BlendedDataset rule (megatron/core/datasets/helpers.cpp, ``build_blending_indices``):
draw n goes to the dataset whose realised count is furthest below its target share,
argmax_i (w_i * (n + 1) - c_i) with the weights normalised to sum 1 and the lowest index winning ties. There
is no RNG: the blend state is the per-dataset draw counts, so the loader's exact resume holds once the state
also holds every dataset's own stream position. For two datasets the counts stay within half a sample of
w_i * n after every draw (tests/data/test_mixture.py; measured over 200 random weightings x 500 draws: at most
0.5 for two datasets, 0.81 for three, 1.01 for five). Packing then delays samples by at most the buffer, and a
draw that turns out to be a bad sample is skipped, not redrawn (it lowers that dataset's share).

Each dataset has its own shards, data-parallel rank assignment, shard order (seeded by the dataset's name) and
epochs: a small dataset repeats while a large one is still in its first pass. With a finite ``data.epochs``
a dataset that has finished drops out and the others go on by their weights, so one pass reads every sample
of every dataset once.
"""
from __future__ import annotations

import os

from mllm_mega.data.shards import list_shards


def mixture_shards(datasets: list[dict]) -> list[list[str]]:
    """The shards of each ``data.datasets`` entry; a shard in two entries is an error naming both."""
    owner: dict[str, str] = {}
    out = []
    for entry in datasets:
        try:
            shards = list_shards(entry["path"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"data.datasets {entry['name']!r}: {exc}") from None
        for s in shards:
            if s in owner:
                raise ValueError(f"data.datasets {entry['name']!r} and {owner[s]!r} both hold the shard {s}; "
                                 "give each shard to one dataset (weights set how often it is read)")
            owner[s] = entry["name"]
        out.append(shards)
    return out


class BlendedStream:
    """The blend of several per-dataset streams (loader._Stream), with the same ``next``/``position`` API."""

    def __init__(self, streams, weights, names):
        total = float(sum(weights))
        self.streams, self.names = list(streams), list(names)
        self.weights = [w / total for w in weights]
        self.counts = [0] * len(self.streams)  # draws handed out per dataset

    def choose(self, active) -> int:
        """The dataset of the next draw among ``active`` indices (see the module docstring)."""
        n = sum(self.counts)
        return max(active, key=lambda i: (self.weights[i] * (n + 1) - self.counts[i], -i))

    def next(self):
        active = list(range(len(self.streams)))
        while active:
            i = self.choose(active)
            item = self.streams[i].next()
            if item is None:  # this dataset has finished its epochs; the others go on
                active.remove(i)
                continue
            self.counts[i] += 1
            return item
        return None

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples of one pass over every dataset on this rank, once each has been read whole."""
        per = [s.samples_per_epoch for s in self.streams]
        return None if any(p is None for p in per) else sum(per)

    def position(self) -> dict:
        return {"counts": list(self.counts), "streams": [s.position() for s in self.streams]}

    def set_position(self, pos: dict):
        if len(pos["streams"]) != len(self.streams):
            raise ValueError(f"loader state holds {len(pos['streams'])} datasets, this mixture {len(self.streams)}")
        self.counts = [int(c) for c in pos["counts"]]
        for stream, p in zip(self.streams, pos["streams"]):
            stream.set_position(p)


def mixture_fingerprint(datasets: list[dict], shards: list[list[str]]) -> list:
    """What a saved state must agree on: names, weights and shard names of every dataset."""
    return [[d["name"], d["weight"], [os.path.basename(s) for s in sh]] for d, sh in zip(datasets, shards)]
