"""Preference batches and config: pair offsets through concat_packs (brute force), config errors, delta state."""
import pytest
import torch

from mllm_mega.config import load_config
from mllm_mega.objectives.preference import PreferenceObjective
from mllm_mega.training.step import concat_packs


def _pack(gen, num_pairs, num_images):
    lengths = torch.randint(2, 9, (2 * num_pairs + 1,), generator=gen)  # + a trailing padding segment
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    ids = torch.randint(0, 1000, (int(cu[-1]),), generator=gen)
    order = torch.randperm(2 * num_pairs, generator=gen).view(num_pairs, 2)  # pairs in any segment order
    grid = torch.tensor([[1, 2, 2]] * num_images)
    return {"input_ids": ids, "labels": ids.clone(), "loss_weights": torch.ones(len(ids)),
            "position_ids": torch.arange(len(ids))[None].expand(3, -1), "cu_seqlens": cu, "max_seqlen": 8,
            "pixel_values": torch.randn(4 * num_images, 6), "image_grid_thw": grid,
            # per image placeholder its feature row (one row per 1x2x2 image here); every row is used
            "image_feature_index": torch.cat([torch.arange(num_images), torch.randint(
                0, max(num_images, 1), (2 * num_pairs,), generator=gen)])[torch.randperm(num_images + 2 * num_pairs,
                                                                                          generator=gen)],
            "pair_segments": order, "pair_keys": [f"k{int(ids[0])}-{i}" for i in range(num_pairs)]}


def test_concat_packs_keeps_each_pair_on_its_own_segments():
    gen = torch.Generator().manual_seed(0)
    packs = [_pack(gen, 2, 1), _pack(gen, 3, 2), _pack(gen, 1, 0), _pack(gen, 2, 3)]
    packs[2].pop("pixel_values"), packs[2].pop("image_grid_thw"), packs[2].pop("image_feature_index")
    mb = concat_packs(packs)
    want_tokens, want_images = [], []
    for p in packs:
        cu = p["cu_seqlens"]
        for c, r in p["pair_segments"].tolist():
            want_tokens.append((p["input_ids"][cu[c]:cu[c + 1]], p["input_ids"][cu[r]:cu[r + 1]]))
        if p.get("image_feature_index") is not None:
            want_images += [p["pixel_values"][4 * i:4 * i + 4] for i in p["image_feature_index"].tolist()]
    cu = mb["cu_seqlens"]
    assert mb["pair_keys"] == [k for p in packs for k in p["pair_keys"]]
    assert len(mb["pair_segments"]) == len(want_tokens) == 8
    for (c, r), (want_c, want_r) in zip(mb["pair_segments"].tolist(), want_tokens):
        assert torch.equal(mb["input_ids"][cu[c]:cu[c + 1]], want_c)
        assert torch.equal(mb["input_ids"][cu[r]:cu[r + 1]], want_r)
    got_images = [mb["pixel_values"][4 * i:4 * i + 4] for i in mb["image_feature_index"].tolist()]
    assert len(got_images) == len(want_images) and all(torch.equal(a, b) for a, b in zip(got_images, want_images))
    with pytest.raises(ValueError, match="pair_segments"):
        concat_packs([packs[0], {k: v for k, v in packs[1].items() if k not in ("pair_segments", "pair_keys")}])


def test_precomputed_reference_is_looked_up_by_key_and_a_missing_key_is_named():
    gen = torch.Generator().manual_seed(1)
    packs = [_pack(gen, 2, 1), _pack(gen, 1, 1)]
    keys = [k for p in packs for k in p["pair_keys"]]
    table = {k: (-1.0 - i, -2.0 - i) for i, k in enumerate(keys)}
    obj = PreferenceObjective(ref_table=table, ref_path="ref.jsonl")
    mb = obj.collate(packs)
    assert mb["ref_logps"].tolist() == [list(table[k]) for k in keys]
    del table[keys[2]]
    with pytest.raises(KeyError, match=f"ref.jsonl.*{keys[2]}"):
        obj.collate(packs)
    with pytest.raises(ValueError, match="pair_segments"):
        obj.collate([{k: v for k, v in packs[0].items() if k not in ("pair_segments", "pair_keys")}])


def test_delta_is_the_mean_of_previous_batch_means_and_round_trips():
    obj = PreferenceObjective(ref_table={})
    assert obj.delta == 0.0
    for mean in (0.3, -0.1, 0.4):
        obj.end_step({"batch_mean_reward": mean}, skipped=False)
    obj.end_step({"batch_mean_reward": 5.0}, skipped=True)  # a skipped step does not count
    obj.end_step({"batch_mean_reward": float("nan")}, skipped=False)
    assert obj.delta == pytest.approx(0.2, abs=1e-15)
    other = PreferenceObjective(ref_table={})
    other.load_state_dict(obj.state_dict())
    assert other.delta == obj.delta and other.state_dict() == obj.state_dict()


@pytest.mark.parametrize("overrides, message", [
    (["objective.nme=preference"], "did you mean 'objective.name'"),
    (["objective.name=dpo"], "objective.name must be one of"),
    (["objective.name=preference", "data.preference=true", "objective.preset=ipo"], "objective.preset must be one of"),
    (["objective.name=preference", "data.preference=true", "objective.beta=0"], "objective.beta must be > 0"),
    (["objective.name=preference", "data.preference=true", "objective.weight_quality=-1"], "objective.weight_quality must be >= 0"),
    (["objective.name=preference", "data.preference=true", "parallel.cp=2"], "context parallel"),
    (["objective.name=preference", "data.preference=true", "parallel.pp=2"],
     "objective.reference=resident needs parallel.pp=1"),
    (["objective.name=preference"], "set data.preference=true"),
])
def test_objective_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_objective_presets_and_overrides():
    cfg = load_config(None, ["objective.name=preference", "data.preference=true", "objective.preset=mpo", "objective.weight_generation=0.5"])
    o = cfg.objective
    assert (o.weight_preference, o.weight_quality, o.weight_generation) == (0.8, 0.2, 0.5)
    o = load_config(None, ["objective.name=preference", "data.preference=true", "objective.preset=dpo_bco"]).objective
    assert (o.weight_preference, o.weight_quality, o.weight_generation) == (1.0, 1.0, 0.0)
    assert load_config(None, []).objective.name == "next_token"
    # a precomputed reference allows pipeline parallelism
    load_config(None, ["objective.name=preference", "data.preference=true", "objective.reference=precomputed", "objective.ref_logps=x",
                       "parallel.pp=2"])
