"""Per-pair log-prob parity with HF transformers for preference training: our packed pairs through
``precompute_ref_logps`` at several layouts against a brute-force per-sample computation with transformers'
model on the same weights.

  torchrun --nproc_per_node=2 tests/models/logps_checks.py OUT.json HF_DIR CKPT TP:PP [TP:PP ...]
      [--loss WORKDIR TP:PP [TP:PP ...]] [--tool CONFIG WORKDIR TP:PP [TP:PP ...]]

Writes {"TP:PP": {"max_abs_diff": x, "num_pairs": n, "keys_match": bool}, "hf": {key: [c, r]},
"duplicate_error": the error every rank raised when two DP ranks read the same pair} (rank 0).
``--loss``: also the preference objective (preset mpo) through ``train_step`` at each layout, the policy the
checkpoint, the reference a second transformers model's log-probs; writes both models' per-pair sums from
transformers ("loss hf") and each step's metrics ("loss TP:PP") for the test's formulas (``loss_checks``).
``--tool``: also ``tools/precompute_ref_logps.py`` (its ``main``, in this process) on CONFIG's preference data
at each layout, with a random model made for the data's tokenizer (an HF dir and its import under WORKDIR);
each file against transformers on the same weights, pair by pair from the loader's packs, under
"tool TP:PP" (max_abs_diff, num_pairs, keys_match).
The pieces are importable for other checks (e.g. the preference loss terms on top of these log-probs):
``preference_pairs`` (the inputs), ``build_pair_packs`` (our packs), ``hf_pair_logps`` (the reference) and
``ours_and_hf_pair_logps`` (both, for one layout); ``loss_checks`` runs the preference loss on top of them.
"""
import json
import sys
import time

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


def duplicate_key_check(load) -> str:
    """DP2 with the same pack on both ranks: every rank must raise (none may hang); returns the message."""
    from mllm_mega.objectives.ref_logps import load_reference_model, precompute_ref_logps

    model, arch = load_reference_model(load)
    packs = build_pair_packs(arch, preference_pairs(arch, num_pairs=1))
    try:
        precompute_ref_logps(model, packs, progress=False)
    except ValueError as e:
        message = str(e)
    else:
        message = ""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, bool(message))
    return message if all(flags) else f"not every rank raised: {flags}"


# ---- the tool on real preference data -------------------------------------------------------------------
def make_hf_and_checkpoint(config: str, workdir: str, seed: int = 0):
    """Collective: a random tiny HF model sized to CONFIG's tokenizer (WORKDIR/hf) and its import
    (WORKDIR/ckpt, saved by every rank as a DP2 training save would). Returns (hf_dir, ckpt, arch)."""
    import os

    import transformers

    from mllm_mega.checkpoint.hf_io import HFCheckpointReader
    from mllm_mega.config import load_config
    from mllm_mega.data.text import TextProcessor
    from mllm_mega.models import registry
    from mllm_mega.models.layout import ParallelLayout
    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training import checkpointing as ckpt
    from mllm_mega.training.setup import arch_config_dict

    cfg = load_config(config, ["model.arch=tiny_qwen2_5_vl"])
    hf = arch_config_dict(cfg, TextProcessor(cfg.data.tokenizer_dir))
    hf_dir, out = os.path.join(workdir, "hf"), os.path.join(workdir, "ckpt")
    initialize_distributed(1, 1)
    if dist.get_rank() == 0:
        config_cls = transformers.AutoConfig.for_model(hf["model_type"]).__class__
        hf_config = config_cls(**{k: v for k, v in hf.items() if k != "model_type"})
        torch.manual_seed(seed)
        model = getattr(transformers, hf["architectures"][0])(hf_config)
        with torch.no_grad():  # norms and biases away from 1 / 0, so every parameter matters
            for name, p in model.named_parameters():
                if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(hf_dir)
    dist.barrier()
    reader = HFCheckpointReader(hf_dir)
    arch = reader.arch
    spec = registry.spec_of(arch)
    model = spec.build_stage(arch, ParallelLayout(), kernels="torch")
    expected = {k: v.shape for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.load_state_dict({k: t.float() for k, t in spec.hf_to_ours(arch, reader.get, expected)}, strict=True)
    ckpt.write_meta(out, {"hf_config": arch.hf_config, "source_dtype": "float32", "source": hf_dir})
    ckpt.save_checkpoint(out, 0, ckpt.model_sharded_state_dict(model))
    return hf_dir, out, arch


def hf_pack_logps(hf_model, arch, pack: dict) -> dict:
    """{pair key: (chosen, rejected)} of one loader pack by transformers, each segment alone: its tokens, the
    images its placeholders point at (``image_feature_index``) with their pixel rows, the labels' tokens."""
    grids = pack.get("image_grid_thw")
    grids = grids.tolist() if grids is not None else []
    unit = arch.vision.spatial_merge_size ** 2
    feat0, pix0, f, q = [], [], 0, 0
    for t, h, w in grids:  # where each image's feature rows and pixel rows start
        feat0.append(f)
        pix0.append(q)
        f, q = f + t * h * w // unit, q + t * h * w
    cu = pack["cu_seqlens"].tolist()
    image_pos = torch.nonzero(pack["input_ids"] == arch.image_token_id).squeeze(1)
    feature_index = pack.get("image_feature_index")

    def segment_sum(s):
        a, b = cu[s], cu[s + 1]
        ids = pack["input_ids"][a:b][None]
        labels = pack["labels"][a:b]
        inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
               "mm_token_type_ids": (ids == arch.image_token_id).to(torch.int32)}
        rows = feature_index[(image_pos >= a) & (image_pos < b)].tolist() if feature_index is not None else []
        sizes = [t * h * w // unit for t, h, w in grids]
        images = sorted({i for r in rows for i in range(len(grids)) if feat0[i] <= r < feat0[i] + sizes[i]})
        if images:
            inp["pixel_values"] = torch.cat([pack["pixel_values"][pix0[i]:pix0[i] + int(torch.tensor(grids[i]).prod())]
                                             for i in images])
            inp["image_grid_thw"] = torch.tensor([grids[i] for i in images])
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(**inp).logits[0].float(), dim=-1)  # (L, V)
        keep = labels != IGNORE
        return float(logp[keep].gather(1, labels[keep][:, None]).sum())

    return {key: (segment_sum(c), segment_sum(r)) for key, (c, r) in zip(pack["pair_keys"],
                                                                        pack["pair_segments"].tolist())}


def tool_checks(config: str, workdir: str, layouts: list[str]) -> dict:
    """Collective: the tool at each layout, each file vs transformers on the loader's packs (rank 0)."""
    import os

    from mllm_mega.checkpoint.convert import load_hf_model
    from mllm_mega.config import load_config
    from mllm_mega.data.loader import build_train_loader
    from mllm_mega.models import registry
    from mllm_mega.objectives.ref_logps import read_ref_logps

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))
    from precompute_ref_logps import main as tool_main

    hf_dir, load, arch = make_hf_and_checkpoint(config, workdir)
    ref = {}
    if dist.get_rank() == 0:  # the reference: every pack of one epoch on one rank, through transformers
        cfg = load_config(config, ["data.epochs=1"])
        hf_model = load_hf_model(hf_dir)
        loader = build_train_loader(cfg.data, dp_rank=0, dp_size=1, **registry.spec_of(arch).loader_options(arch))
        for pack in loader:
            ref.update(hf_pack_logps(hf_model, arch, pack))
        loader.close()
    out = {}
    for layout in layouts:
        tp, pp = layout.split(":")
        path = os.path.join(workdir, f"ref_logps.tp{tp}pp{pp}.json")
        code = tool_main(["--config", config, "--load", load, "--tp", tp, "--pp", pp, "--out", path,
                          "--no-progress"])
        if dist.get_rank() == 0:
            mapping, meta = read_ref_logps(path) if code == 0 else ({}, {})
            diff = max((abs(a - b) for k in ref for a, b in zip(mapping.get(k, (float("inf"),) * 2), ref[k])),
                       default=float("inf"))
            out[f"tool {layout}"] = {"code": code, "max_abs_diff": diff, "num_pairs": len(mapping),
                                     "keys_match": set(mapping) == set(ref), "layout": meta.get("layout")}
            print(f"[logps] tool tp={tp} pp={pp} pairs={len(mapping)} max_abs_diff={diff:.3e}", flush=True)
    return out

# ---- the preference objective's loss terms on top of these log-probs ------------------------------------
LOSS_BETA = 0.5  # not 1: a beta applied twice or not at all must show


def perturbed_hf_model(hf_model, seed: int = 1, scale: float = 2.0):
    """A second transformers model: every parameter of ``hf_model`` plus scale * its std * N(0, 1), seeded."""
    import copy

    other = copy.deepcopy(hf_model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(other.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale * (float(p.std()) if p.numel() > 1 else 1.0))
    return other


def loss_check(load, ref_table: dict, *, tp: int, pp: int, workdir: str, steps: int = 2) -> list[dict]:
    """Collective: the policy = checkpoint ``load`` at TP x PP through the real ``train_step`` with
    ``PreferenceObjective`` (preset mpo, reference = ``ref_table``, precomputed) on the pairs of
    ``preference_pairs``, each DP rank one micro-batch of its packs. ``steps`` steps at lr 1e-12 (the weights
    do not move at fp32 resolution), so step 2 sees the same log-probs with the BCO delta of step 1.
    Returns each step's metrics. Loss weights: 1/sqrt(completion length) on every completion token."""
    from megatron.core import parallel_state as ps

    from mllm_mega.config import load_config
    from mllm_mega.objectives.config import OBJECTIVE_PRESETS
    from mllm_mega.objectives.preference import PreferenceObjective
    from mllm_mega.objectives.ref_logps import load_reference_model
    from mllm_mega.training import setup
    from mllm_mega.training.step import train_step

    model, arch = load_reference_model(load, tp=tp, pp=pp)
    model.train()
    packs = build_pair_packs(arch, preference_pairs(arch), pad_to_multiple=tp)
    for pack in packs:
        as_training_pack(pack, arch)
    cfg = load_config(None, [f"run_dir={workdir}", "optimizer.lr=1e-12", "optimizer.clip_grad=0"])
    ddp = setup.wrap_ddp(model, cfg)
    optimizer, _ = setup.build_optimizer(ddp, cfg, torch.float32)
    objective = PreferenceObjective(beta=LOSS_BETA, weights=OBJECTIVE_PRESETS["mpo"], ref_table=ref_table)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = [objective.collate(packs[dp_rank::dp])]
    return [train_step(ddp, optimizer, micro, kernels="torch", dp_group=ps.get_data_parallel_group(),
                       objective=objective) for _ in range(steps)]


def as_training_pack(pack: dict, arch) -> None:
    """What the training loader adds: max_seqlen, and loss_weights as square reweighting gives them
    (1/sqrt(n) on each of a completion's n label tokens)."""
    cu, on = pack["cu_seqlens"].tolist(), (pack["labels"] != IGNORE).float()
    pack["max_seqlen"] = max(b - a for a, b in zip(cu, cu[1:]))
    if "image_grid_thw" in pack:  # every placeholder its own feature row, in order (what packs without it mean)
        pack["image_feature_index"] = torch.arange(int((pack["input_ids"] == arch.image_token_id).sum()))
    weights = torch.zeros_like(on)
    for a, b in zip(cu, cu[1:]):
        n = float(on[a:b].sum())
        weights[a:b] = on[a:b] * (n ** -0.5 if n else 0.0)
    pack["loss_weights"] = weights


def loss_checks(hf_model, load, layouts: list[str], workdir: str) -> dict:
    """Collective: ``loss_check`` at each layout against a reference table made by a second transformers model
    (``perturbed_hf_model``), so rewards are not 0. Returns (rank 0) {"loss hf": {key: [policy chosen,
    policy rejected, ref chosen, ref rejected, chosen completion length]} from transformers, "loss TP:PP":
    [step metrics]}; the formulas are for the test to write out."""
    from mllm_mega.models import registry
    from mllm_mega.training import checkpointing as ckpt

    start = time.perf_counter()
    arch = registry.arch_from_hf_config(ckpt.read_meta(load)["hf_config"])
    pairs = preference_pairs(arch)
    box = [None]
    if dist.get_rank() == 0:
        policy, ref = hf_pair_logps(hf_model, arch, pairs), hf_pair_logps(perturbed_hf_model(hf_model), arch, pairs)
        box[0] = {"policy": policy, "ref": ref}
    dist.broadcast_object_list(box, src=0)
    out = {"loss hf": {p["key"]: [*box[0]["policy"][p["key"]], *box[0]["ref"][p["key"]], len(p["chosen"])]
                       for p in pairs}}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split(":"))
        out[f"loss {layout}"] = loss_check(load, box[0]["ref"], tp=tp, pp=pp, workdir=workdir)
        if dist.get_rank() == 0:
            print(f"[logps] loss tp={tp} pp={pp} loss={out[f'loss {layout}'][0]['loss']:.6f} "
                  f"({time.perf_counter() - start:.1f} s since the loss checks began)", flush=True)
    return out


if __name__ == "__main__":
    import os

    from mllm_mega.checkpoint.convert import load_hf_model

    argv = sys.argv[1:]
    loss_args = []
    if "--loss" in argv:  # --loss WORKDIR TP:PP [TP:PP ...], up to the next --option
        i = argv.index("--loss")
        j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
        loss_args, argv = argv[i + 1:j], argv[:i] + argv[j:]
    tool_args = argv[argv.index("--tool") + 1:] if "--tool" in argv else []
    argv = argv[:argv.index("--tool")] if "--tool" in argv else argv
    out_path, hf_dir, load, layouts = argv[0], argv[1], argv[2], argv[3:]
    hf_model = load_hf_model(hf_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    result = {}
    for layout in layouts:
        tp, pp = (int(x) for x in layout.split(":"))
        ours, ref = ours_and_hf_pair_logps(hf_dir, load, tp=tp, pp=pp, hf_model=hf_model)
        if dist.get_rank() == 0:
            diff = max(abs(a - b) for k in ref for a, b in zip(ours.get(k, (float("inf"),) * 2), ref[k]))
            result[layout] = {"max_abs_diff": diff, "num_pairs": len(ours), "keys_match": set(ours) == set(ref)}
            result["hf"] = {k: list(v) for k, v in ref.items()}
            print(f"[logps] tp={tp} pp={pp} pairs={len(ours)} max_abs_diff={diff:.3e}", flush=True)
    result["duplicate_error"] = duplicate_key_check(load)
    if loss_args:
        result.update(loss_checks(hf_model, load, loss_args[1:], loss_args[0]))
    if tool_args:
        dist.destroy_process_group = lambda *a, **k: None  # the tool's main ends the world; keep it
        result.update(tool_checks(tool_args[0], tool_args[1], tool_args[2:]))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
