"""Tests for the C++ FFD/BFD packer (csrc/packer.cpp) against the plain-Python reference, hand-worked
examples and a brute-force optimal bin packing."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mllm_mega import _packer
from mllm_mega.data.packing import (
    csr_to_bins,
    pack_bfd,
    pack_bfd_reference,
    pack_ffd,
    pack_ffd_csr,
    pack_ffd_reference,
    packing_stats,
)

FAST = {"ffd": pack_ffd, "bfd": pack_bfd}
REFERENCE = {"ffd": pack_ffd_reference, "bfd": pack_bfd_reference}
ALL_IMPLS = [pack_ffd, pack_bfd, pack_ffd_reference, pack_bfd_reference]


def as_lists(bins):
    return [b.tolist() for b in bins]


# ------------------------------------------------------------------ hand-worked examples (independent of code)


def test_ffd_and_bfd_hand_example():
    # capacity 10, lengths 8, 6, 3, 1 (already descending).
    # FFD: 8 -> bin0 (res 2); 6 -> bin1 (res 4); 3 does not fit bin0 -> bin1 (res 1); 1 -> bin0, the first bin
    #      with room (res 2) -> [[0, 3], [1, 2]].
    # BFD: same until 1, which goes to the bin with the smallest residual that fits: bin1 (1) over bin0 (2).
    lengths = np.array([8, 6, 3, 1])
    for fn in (pack_ffd, pack_ffd_reference):
        assert as_lists(fn(lengths, 10)) == [[0, 3], [1, 2]]
    for fn in (pack_bfd, pack_bfd_reference):
        assert as_lists(fn(lengths, 10)) == [[0], [1, 2, 3]]


def test_ties_broken_by_index_and_zero_length_items():
    # Equal lengths visit in index order; zero-length items come last and go to the first bin with room on
    # the other caps. capacity 4: 2(i1), 2(i3) -> bin0 full; 2(i4) -> bin1; then 0(i0), 0(i2) -> bin0.
    lengths = np.array([0, 2, 0, 2, 2], dtype=np.int32)
    for fn in (pack_ffd, pack_ffd_reference, pack_bfd, pack_bfd_reference):
        assert as_lists(fn(lengths, 4)) == [[1, 3, 0, 2], [4]]
    # With max_items=3 bin0 closes after item 0, so item 2 joins bin1.
    for fn in (pack_ffd, pack_ffd_reference, pack_bfd, pack_bfd_reference):
        assert as_lists(fn(lengths, 4, max_items=3)) == [[1, 3, 0], [4, 2]]


def test_image_cap_hand_example():
    # capacity 100, max_images 2. Sorted: i0 (50, 2 img), i1 (40, 0), i2 (30, 1), i3 (10, 1).
    # FFD: i0 -> bin0; i1 -> bin0 (90 tokens, 2 img); i2 fits bin0 on tokens? no (120) -> bin1;
    #      i3: bin0 has room for tokens (10) but is full on images -> bin1 (2 img).
    lengths = np.array([50, 40, 30, 10])
    images = np.array([2, 0, 1, 1])
    for fn in (pack_ffd, pack_ffd_reference, pack_bfd, pack_bfd_reference):
        assert as_lists(fn(lengths, 100, images=images, max_images=2)) == [[0, 1], [2, 3]]
    # Without the cap i3 fills bin0 exactly.
    for fn in (pack_ffd, pack_ffd_reference):
        assert as_lists(fn(lengths, 100, images=images)) == [[0, 1, 3], [2]]


def test_ffd_backtracks_past_image_full_bins():
    # capacity 100, max_images 1; items (tokens, images), already in visiting order:
    # i0 (90, 0) -> b0 (res 10); i1 (50, 1) -> b1 (res 50, image-full); i2 (45, 1): b0 too full, b1
    # image-full -> b2; i3 (20, 1): the subtree {b0, b1} has max residual 50 (b1) and min images 0 (b0) but
    # no bin with both, so the tree descent must back out of it; b2 is image-full too -> new bin b3;
    # i4 (10, 0) -> b0, the first bin with room (exactly full).
    lengths = np.array([90, 50, 45, 20, 10])
    images = np.array([0, 1, 1, 1, 0])
    for fn in (pack_ffd, pack_ffd_reference, pack_bfd, pack_bfd_reference):
        assert as_lists(fn(lengths, 100, images=images, max_images=1)) == [[0, 4], [1], [2], [3]]


# ------------------------------------------------------------------ property tests against the reference


@st.composite
def packing_problems(draw):
    n = draw(st.integers(0, 40))
    # Small capacities use the counting sort; capacities above 2**16 + 4n the comparison sort.
    big = draw(st.booleans())
    capacity = draw(st.integers(1, 60)) if not big else draw(st.integers(1 << 17, (1 << 17) + 60))
    base = 0 if not big else capacity - 60
    lengths = [draw(st.one_of(st.integers(0, 60), st.just(0))) for _ in range(n)]
    if big:
        lengths = [max(0, base + v) if v else 0 for v in lengths]
    # A few lengths above the capacity exercise the unpackable path.
    lengths = [v if draw(st.integers(0, 9)) else capacity + 1 + v for v in lengths]
    images = draw(st.none() | st.lists(st.integers(0, 4), min_size=n, max_size=n))
    max_images = None if images is None else draw(st.none() | st.integers(0, 5))
    max_items = draw(st.none() | st.integers(1, 5))
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    img_dtype = draw(st.sampled_from([np.int32, np.int64]))
    return dict(
        lengths=np.array(lengths, dtype=dtype),
        capacity=capacity,
        images=None if images is None else np.array(images, dtype=img_dtype),
        max_images=max_images,
        max_items=max_items,
    )


def check_invariants(problem, bins, unpackable):
    lengths, capacity = problem["lengths"], problem["capacity"]
    images, max_images, max_items = problem["images"], problem["max_images"], problem["max_items"]
    placed = np.concatenate(bins + [unpackable]) if bins or len(unpackable) else np.zeros(0, np.int64)
    assert sorted(placed.tolist()) == list(range(len(lengths))), "every item exactly once"
    for b in bins:
        assert b.dtype == np.int64 and len(b) > 0
        assert int(lengths[b].sum()) <= capacity
        if max_images is not None:
            assert int(images[b].sum()) <= max_images
        if max_items is not None:
            assert len(b) <= max_items
    for i in unpackable.tolist():
        assert lengths[i] > capacity or (max_images is not None and images[i] > max_images)
    assert unpackable.tolist() == sorted(unpackable.tolist())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=packing_problems(), algo=st.sampled_from(["ffd", "bfd"]))
def test_matches_reference_and_invariants(problem, algo):
    bins, unpackable = FAST[algo](**problem, allow_unpackable=True)
    ref_bins, ref_unpackable = REFERENCE[algo](**problem, allow_unpackable=True)
    assert as_lists(bins) == as_lists(ref_bins)
    assert unpackable.tolist() == ref_unpackable.tolist()
    check_invariants(problem, bins, unpackable)
    # Deterministic across calls and across the input dtype.
    assert as_lists(FAST[algo](**problem, allow_unpackable=True)[0]) == as_lists(bins)
    other = dict(problem, lengths=problem["lengths"].astype(
        np.int64 if problem["lengths"].dtype == np.int32 else np.int32))
    assert as_lists(FAST[algo](**other, allow_unpackable=True)[0]) == as_lists(bins)
    # Without allow_unpackable: the same bins, or a ValueError naming the first unpackable item.
    if len(unpackable):
        first = int(unpackable[0])
        with pytest.raises(ValueError, match=rf"\[{first}\]"):
            FAST[algo](**problem)
        with pytest.raises(ValueError, match=rf"\[{first}\]"):
            REFERENCE[algo](**problem)
    else:
        assert as_lists(FAST[algo](**problem)) == as_lists(bins)


def caption_like(rng, n):
    return (rng.integers(64, 1025, n) + rng.integers(20, 201, n)).astype(np.int64)


@pytest.mark.parametrize("algo", ["ffd", "bfd"])
@pytest.mark.parametrize("caps", [{}, {"max_images": 6, "max_items": 5}])
def test_matches_reference_on_a_larger_caption_like_input(algo, caps):
    rng = np.random.default_rng(0)
    n = 1500
    lengths = caption_like(rng, n)
    images = rng.integers(0, 4, n)
    kwargs = dict(images=images, **caps) if caps else {}
    bins = FAST[algo](lengths, 4096, **kwargs)
    assert as_lists(bins) == as_lists(REFERENCE[algo](lengths, 4096, **kwargs))
    problem = dict(lengths=lengths, capacity=4096, images=images, max_images=caps.get("max_images"),
                   max_items=caps.get("max_items"))
    check_invariants(problem, bins, np.zeros(0, np.int64))


def test_strided_input_and_csr():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 100, 200)
    strided = base[::3]  # non-contiguous view
    assert as_lists(pack_ffd(strided, 150)) == as_lists(pack_ffd_reference(np.ascontiguousarray(strided), 150))
    offsets, indices, unpackable = pack_ffd_csr(strided, 150)
    assert offsets.dtype == indices.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(strided)
    assert np.all(np.diff(offsets) > 0) and len(unpackable) == 0
    assert as_lists(csr_to_bins(offsets, indices)) == as_lists(pack_ffd(strided, 150))


@pytest.mark.parametrize("fn", ALL_IMPLS)
def test_empty_input(fn):
    assert fn(np.zeros(0, np.int32), 10) == []
    assert fn([], 10) == []
    bins, unpackable = fn(np.zeros(0, np.int64), 10, allow_unpackable=True)
    assert bins == [] and unpackable.dtype == np.int64 and len(unpackable) == 0


# ------------------------------------------------------------------ FFD bound against brute-force OPT


def optimal_num_bins(lengths, capacity):
    """Exhaustive branch and bound: each item (largest first) into an open bin or a new one."""
    items = sorted(lengths, reverse=True)
    best = [len(items)]

    def search(k, loads):
        if len(loads) >= best[0]:
            return
        if k == len(items):
            best[0] = len(loads)
            return
        seen = set()
        for b in range(len(loads)):
            if loads[b] + items[k] <= capacity and loads[b] not in seen:
                seen.add(loads[b])  # bins with equal load are interchangeable
                loads[b] += items[k]
                search(k + 1, loads)
                loads[b] -= items[k]
        loads.append(items[k])
        search(k + 1, loads)
        loads.pop()

    search(0, [])
    return best[0]


def test_brute_force_optimum_on_known_cases():
    assert optimal_num_bins([8, 6, 3, 1], 10) == 2
    assert optimal_num_bins([6, 6, 4, 4], 10) == 2  # FFD/BFD also find 2
    assert optimal_num_bins([5, 5, 5], 10) == 2
    assert optimal_num_bins([1] * 7, 3) == 3


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8), capacity=st.integers(20, 30))
def test_ffd_within_dosa_bound_of_optimum(lengths, capacity):
    opt = optimal_num_bins(lengths, capacity)
    assert opt >= math.ceil(sum(lengths) / capacity)
    num_ffd = len(pack_ffd(np.array(lengths), capacity))
    assert opt <= num_ffd <= 11 / 9 * opt + 6 / 9
    assert opt <= len(pack_bfd(np.array(lengths), capacity))


def test_ffd_bound_on_a_case_where_ffd_is_not_optimal():
    # capacity 10, lengths 4,4,3,3,3,3 (sum 20). FFD: 4,4 (8) | 3,3,3 (9) | 3 -> 3 bins;
    # optimal: 4,3,3 | 4,3,3 -> 2 bins.
    lengths = [4, 4, 3, 3, 3, 3]
    assert len(pack_ffd(np.array(lengths), 10)) == 3
    assert optimal_num_bins(lengths, 10) == 2


# ------------------------------------------------------------------ bad inputs


BAD_INPUTS = [
    (dict(lengths=np.array([3, -1, 2]), capacity=10), r"lengths\[1\]"),
    (dict(lengths=np.array([3, 1]), capacity=0), "capacity"),
    (dict(lengths=np.array([3, 1]), capacity=-5), "capacity"),
    (dict(lengths=np.array([3.0, 1.0]), capacity=10), "lengths"),
    (dict(lengths=np.array([[3, 1]]), capacity=10), "lengths"),
    (dict(lengths=np.array([3, 1], dtype=np.uint32), capacity=10), "lengths"),
    (dict(lengths=np.array([3, 1], dtype=">i8"), capacity=10), "lengths"),
    (dict(lengths=np.array([3, 1]), capacity=10, images=np.array([1]), max_images=2), "images"),
    (dict(lengths=np.array([3, 1]), capacity=10, images=np.array([1.0, 2.0]), max_images=2), "images"),
    (dict(lengths=np.array([3, 1]), capacity=10, images=np.array([1, -2]), max_images=2), r"images\[1\]"),
    (dict(lengths=np.array([3, 1]), capacity=10, max_images=2), "max_images"),
    (dict(lengths=np.array([3, 1]), capacity=10, images=np.array([1, 1]), max_images=-1), "max_images"),
    (dict(lengths=np.array([3, 1]), capacity=10, max_items=0), "max_items"),
    (dict(lengths=np.array([3, 11]), capacity=10), r"lengths\[1\] = 11 exceeds capacity"),
    (dict(lengths=np.array([3, 1]), capacity=10, images=np.array([0, 3]), max_images=2),
     r"images\[1\] = 3 exceeds max_images"),
]


@pytest.mark.parametrize("fn", ALL_IMPLS)
@pytest.mark.parametrize("kwargs,match", BAD_INPUTS)
def test_bad_inputs_raise_value_error(fn, kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(kwargs.pop("lengths"), kwargs.pop("capacity"), **kwargs)


def test_wrapper_rejects_non_int_capacity():
    with pytest.raises(ValueError, match="capacity"):
        pack_ffd(np.array([1, 2]), 10.0)
    with pytest.raises(ValueError, match="capacity"):
        pack_ffd(np.array([1, 2]), True)


def test_extension_does_not_convert_lists():
    # noconvert: the raw binding takes numpy arrays only; the wrapper converts lists without casting.
    with pytest.raises(TypeError):
        _packer.ffd([3, 1], 10)
    assert as_lists(pack_ffd([3, 1], 10)) == [[0, 1]]
    with pytest.raises(ValueError, match="lengths"):
        pack_ffd([3.5, 1.0], 10)


# ------------------------------------------------------------------ stats


def test_packing_stats():
    lengths = np.array([8, 6, 3, 1])
    bins = [np.array([0, 3]), np.array([1, 2])]
    stats = packing_stats(lengths, bins, 10, images=np.array([1, 0, 2, 0]))
    assert stats["num_bins"] == 2 and stats["num_items"] == 4 and stats["packed_tokens"] == 18
    assert stats["efficiency"] == pytest.approx(18 / 20)
    assert stats["lower_bound_bins"] == 2
    assert stats["items_per_bin_mean"] == 2.0 and stats["items_per_bin_max"] == 2
    assert stats["tokens_per_bin_max"] == 9
    assert stats["images_per_bin_max"] == 2 and stats["images_per_bin_mean"] == 1.5
    assert packing_stats(lengths, [], 10)["efficiency"] == 1.0


def test_bench_packing_smoke(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "bench_packing.py"
    spec = importlib.util.spec_from_file_location("bench_packing_tool", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "300", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["identical_to_ref"] is True
        assert row["lower_bound_bins"] <= row["ffd_bins"] and 0 < row["ffd_efficiency"] <= 1
