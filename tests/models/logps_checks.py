"""Per-pair log-prob parity with HF transformers for preference training: our packed pairs through
``precompute_ref_logps`` at several layouts against a brute-force per-sample computation with transformers'
model on the same weights.

  torchrun --nproc_per_node=2 tests/models/logps_checks.py OUT.json HF_DIR CKPT TP:PP [TP:PP ...]

Writes {"TP:PP": {"max_abs_diff": x, "num_pairs": n, "keys_match": bool}, "hf": {key: [c, r]}} (rank 0).
The pieces are importable for other checks (e.g. the preference loss terms on top of these log-probs):
``preference_pairs`` (the inputs), ``build_pair_packs`` (our packs), ``hf_pair_logps`` (the reference) and
``ours_and_hf_pair_logps`` (both, for one layout).
"""
import json
import sys

import torch
import torch.distributed as dist

IGNORE = -100


def preference_pairs(arch, num_pairs: int = 4, seed: int = 0) -> list[dict]:
    """Pairs with an image in each prompt (grids of different sizes, one text-only prompt), chosen and rejected
    completions of different lengths. Each: key, prompt / chosen / rejected token lists, grid, pixel_values."""
    g = torch.Generator().manual_seed(seed)
    text_vocab = min(arch.image_token_id, arch.video_token_id, arch.vision_start_token_id)
    m2 = arch.vision.spatial_merge_size ** 2

    def text(n):
        return torch.randint(0, text_vocab, (n,), generator=g).tolist()

    grids = [(1, 4, 6), (1, 6, 4), None, (1, 4, 4)]
    pairs = []
    for i in range(num_pairs):
        grid = grids[i % len(grids)]
        prompt = text(3 + i)
        pixels = None
        if grid is not None:
            n = grid[0] * grid[1] * grid[2] // m2
            prompt += [arch.vision_start_token_id] + [arch.image_token_id] * n + [arch.vision_end_token_id]
            pixels = torch.randn(grid[0] * grid[1] * grid[2], arch.vision.patch_dim, generator=g)
        prompt += text(2)
        pairs.append({"key": f"pair-{seed}-{i:03d}", "prompt": prompt, "chosen": text(5 + 2 * i),
                      "rejected": text(9 - i), "grid": grid, "pixel_values": pixels})
    return pairs


def _rows(pair):
    return [pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]]


def build_pair_packs(arch, pairs: list[dict], *, pairs_per_pack: int = 2, pad_to_multiple: int = 1) -> list[dict]:
    """Our packs: each pair's chosen then rejected segment (each with its own copy of the image), labels the
    completion's next tokens, ``pair_segments`` / ``pair_keys`` as the preference collate gives them."""
    from mllm_mega.models import registry

    spec = registry.spec_of(arch)
    packs = []
    for start in range(0, len(pairs), pairs_per_pack):
        group = pairs[start:start + pairs_per_pack]
        rows = [r for p in group for r in _rows(p)]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        grids = [p["grid"] for p in group for _ in range(2) if p["grid"] is not None]
        grid_thw = torch.tensor(grids, dtype=torch.long) if grids else None
        packed, pos, cu, index = spec.pack_hf_batch(arch, ids, mask, grid_thw, None, None,
                                                    pad_to_multiple=pad_to_multiple)
        labels = torch.full((packed.shape[0],), IGNORE, dtype=torch.long)
        for i, p in enumerate(p for p in group for _ in range(2)):
            a, n, prompt_len = int(cu[i]), len(rows[i]), len(p["prompt"])
            # label of position t is token t + 1 when that token belongs to the completion
            labels[a + prompt_len - 1:a + n - 1] = packed[a + prompt_len:a + n]
        pack = {"input_ids": packed, "position_ids": pos, "cu_seqlens": cu, "labels": labels,
                "pair_segments": torch.tensor([[2 * j, 2 * j + 1] for j in range(len(group))]),
                "pair_keys": [p["key"] for p in group]}
        if grids:
            pack["pixel_values"] = torch.cat([p["pixel_values"] for p in group for _ in range(2)
                                              if p["grid"] is not None])
            pack["image_grid_thw"] = grid_thw
        packs.append(pack)
    return packs


def hf_pair_logps(hf_model, arch, pairs: list[dict]) -> dict:
    """Brute force, independent of our code: transformers' forward on each sample alone (batch of one, no
    padding), log_softmax over the full vocabulary, the completion tokens' log-probs summed in fp32."""
    out = {}
    for p in pairs:
        sums = []
        for completion in (p["chosen"], p["rejected"]):
            ids = torch.tensor([p["prompt"] + completion])
            inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "mm_token_type_ids": (ids == arch.image_token_id).to(torch.int32)}  # MRoPE (transformers 5)
            if p["grid"] is not None:
                inp.update(pixel_values=p["pixel_values"], image_grid_thw=torch.tensor([p["grid"]]))
            with torch.no_grad():
                logits = hf_model(**inp).logits[0].float()  # (L, V)
            logp = torch.log_softmax(logits, dim=-1)
            n0 = len(p["prompt"])
            targets = ids[0, n0:]
            sums.append(float(logp[n0 - 1:ids.shape[1] - 1].gather(1, targets[:, None]).sum()))
        out[p["key"]] = tuple(sums)
    return out


def ours_and_hf_pair_logps(hf_dir, load, *, tp, pp, pairs=None, kernels="torch", hf_model=None):
    """(ours {key: (chosen, rejected)} on every rank, HF's on rank 0 else None) for one TP x PP layout; the
    remaining ranks are data-parallel and share the packs out (so the DP gather is exercised too)."""
    from megatron.core import parallel_state as ps

    from mllm_mega.checkpoint.convert import load_hf_model
    from mllm_mega.objectives.ref_logps import load_reference_model, precompute_ref_logps

    model, arch = load_reference_model(load, tp=tp, pp=pp, kernels=kernels)
    pairs = pairs if pairs is not None else preference_pairs(arch)
    packs = build_pair_packs(arch, pairs, pad_to_multiple=tp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ours = precompute_ref_logps(model, packs[dp_rank::dp], kernels=kernels, progress=False)
    ref = None
    if dist.get_rank() == 0:
        ref = hf_pair_logps(hf_model if hf_model is not None else load_hf_model(hf_dir), arch, pairs)
    return ours, ref


if __name__ == "__main__":
    from mllm_mega.checkpoint.convert import load_hf_model

    out_path, hf_dir, load, layouts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    hf_model = load_hf_model(hf_dir) if int(__import__("os").environ.get("RANK", "0")) == 0 else None
    result = {}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split(":"))
        ours, ref = ours_and_hf_pair_logps(hf_dir, load, tp=tp, pp=pp, hf_model=hf_model)
        if dist.get_rank() == 0:
            diff = max(abs(a - b) for k in ref for a, b in zip(ours.get(k, (float("inf"),) * 2), ref[k]))
            result[layout] = {"max_abs_diff": diff, "num_pairs": len(ours), "keys_match": set(ours) == set(ref)}
            result["hf"] = {k: list(v) for k, v in ref.items()}
            print(f"[logps] tp={tp} pp={pp} pairs={len(ours)} max_abs_diff={diff:.3e}", flush=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
