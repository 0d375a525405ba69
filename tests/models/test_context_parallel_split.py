"""Context-parallel split and attention in one process (each CP rank simulated; the all-gather replaced by
the concatenation of every rank's local keys): references are the unsplit pack and per-segment SDPA."""
import pytest
import torch
import torch.nn.functional as F

from mllm_mega.models.common.context_parallel import cp_attention
from mllm_mega.parallel.context import assign_media, make_shard, shard_batch, target_length

# odd sample lengths, one of 1 token, one shorter than 2*CP, an empty segment, and a trailing padding segment
CU = torch.tensor([0, 7, 8, 8, 21, 26, 40], dtype=torch.int32)


@pytest.mark.parametrize("cp,multiple", [(2, 1), (2, 2), (3, 1), (4, 2)])
def test_every_token_on_exactly_one_rank(cp, multiple):
    shards = [make_shard(CU, cp, r, multiple=multiple) for r in range(cp)]
    idx = torch.cat([s.index for s in shards])
    real = idx[idx >= 0]
    # no token dropped, none duplicated (TE #1930 dropped unpadded tails)
    assert sorted(real.tolist()) == list(range(int(CU[-1])))
    for s in shards:
        assert s.local_len == s.padded_len // cp and s.local_len % multiple == 0
        assert int(s.cu_seqlens[-1]) == s.local_len
    # rank r holds chunks r and 2cp-1-r of each sample: sample 8..21 (len 13 -> chunk c = ceil(13/2cp))
    c = -(-13 // (2 * cp))
    start = int(shards[0].cu_seqlens[2])  # the 3rd non-empty segment on rank 0 (the empty one is skipped)
    seg = shards[0].index[start:start + 2 * c].tolist()
    want = [8 + i if i < 13 else -1 for i in list(range(0, c)) + list(range((2 * cp - 1) * c, 2 * cp * c))]
    assert seg == want


def test_layout_errors_name_the_problem():
    with pytest.raises(ValueError, match="target length 10 cannot hold"):
        make_shard(CU, 2, 0, target_len=10)
    with pytest.raises(ValueError, match="target length 46 cannot hold .* divisible by 4"):
        make_shard(CU, 2, 0, target_len=46, multiple=4)
    with pytest.raises(ValueError, match="rank 2 outside CP size 2"):
        make_shard(CU, 2, 2)
    assert target_length([CU, torch.tensor([0, 50], dtype=torch.int32)], 2, 2) == 52


def test_layout_that_does_not_divide_the_world_is_refused():
    from mllm_mega.config import ParallelConfig
    from mllm_mega.parallel.initialize import initialize_distributed

    with pytest.raises(ValueError, match="world size 1 is not divisible by TP=1 x PP=1 x CP=2"):
        initialize_distributed(1, 1, context_parallel_size=2)
    with pytest.raises(ValueError, match="parallel.cp"):
        ParallelConfig(cp=0)


def test_assign_media_balances_largest_first():
    assert assign_media([4, 16, 4, 4, 8], 2) == [1, 0, 1, 0, 1]


def _cp_outputs(q, k, v, cp, causal, kernels, cu):
    shards = [make_shard(cu, cp, r, causal=causal) for r in range(cp)]

    def local(x, s):
        return torch.where((s.index >= 0)[:, None, None], x[s.index.clamp(min=0)], torch.zeros(()))

    kv_all = torch.cat([torch.cat([local(k, s), local(v, s)], dim=1) for s in shards])
    out = torch.zeros_like(q)
    for s in shards:
        o = cp_attention(local(q, s), local(k, s), local(v, s), s, kernels=kernels, softmax_scale=0.3,
                         causal=causal, gather=lambda x, shard: kv_all)
        real = s.index >= 0
        out = out.index_put((s.index[real],), o[real])
    return out


def packed_attention_sdpa(q, k, v, cu_seqlens, causal: bool, softmax_scale: float) -> torch.Tensor:
    """Independent reference: torch's SDPA on each packed segment. q (T, Hq, D), k/v (T, Hkv, D)."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs = q[start:end].transpose(0, 1)  # (Hq, L, D)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        out[start:end] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("cp,causal,kernels,cu,heads", [
    (2, True, "torch", CU, (4, 2)), (3, True, "torch", CU, (4, 2)), (2, False, "torch", CU, (4, 2)),
    # the Triton kernel under the interpreter on CPU (~15 s): fewer segments and heads
    (2, True, "triton", CU[[0, 1, 2, 4]], (2, 1))], ids=["cp2", "cp3", "cp2-full", "cp2-triton"])
def test_cp_attention_equals_unsplit_with_gradients(cp, causal, kernels, cu, heads):
    g = torch.Generator().manual_seed(0)
    total = int(cu[-1])
    q = torch.randn(total, heads[0], 8, generator=g, requires_grad=True)
    k = torch.randn(total, heads[1], 8, generator=g, requires_grad=True)
    v = torch.randn(total, heads[1], 8, generator=g, requires_grad=True)
    ref = packed_attention_sdpa(q, k, v, cu, causal, 0.3)
    got = _cp_outputs(q, k, v, cp, causal, kernels, cu)
    # fp32, different key-set lengths per softmax: measured <= 3e-7
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    w = torch.randn(ref.shape, generator=g)
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    grads_cp = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(grads_cp, grads_ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def test_shard_batch_slices_with_one_index():
    T = int(CU[-1])
    mb = {"input_ids": torch.arange(100, 100 + T), "labels": torch.arange(T), "loss_weights": torch.rand(T),
          "position_ids": torch.arange(3 * T).view(3, T), "cu_seqlens": CU}
    mb["input_ids"][[3, 4, 30]] = 7  # three image placeholders: one 1x2x2 grid (merge unit 4) -> 1 token? no: 3
    mb["pixel_values"] = torch.zeros(12, 5)
    mb["image_grid_thw"] = torch.tensor([[1, 2, 2], [1, 4, 2]])
    s = make_shard(CU, 2, 1)
    out = shard_batch(mb, s, image_token_id=7, video_token_id=9, merge_unit=4)
    real = s.index >= 0
    for key in ("input_ids", "labels", "loss_weights"):
        assert torch.equal(out[key][real], mb[key][s.index[real]])
    assert torch.equal(out["position_ids"][:, real], mb["position_ids"][:, s.index[real]])
    assert (out["labels"][~real] == -100).all() and (out["loss_weights"][~real] == 0).all()
    slots = {int(i): int(f) for i, f in zip(s.index, s.feature_slot) if f >= 0}
    assert all({3: 0, 4: 1, 30: 2}[i] == f for i, f in slots.items())
    mb["image_grid_thw"] = torch.tensor([[1, 2, 2]])
    with pytest.raises(ValueError, match="3 image placeholder tokens in input_ids but image_grid_thw gives 1"):
        shard_batch(mb, make_shard(CU, 2, 0), image_token_id=7, video_token_id=9, merge_unit=4)
