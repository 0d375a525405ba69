"""Context-parallel pieces of ``verify``: split a verify batch, gather CP logits back into pack order, and
compare every parameter gradient at CP with CP=1's on the same inputs and weights."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mllm_mega.parallel.context import cp_group_and_rank, media_kwargs, shard_microbatches


def shard_for_rank(batch: dict, arch, config) -> dict:
    """This CP rank's slice of a verify batch (local length divisible by TP under sequence parallelism)."""
    group, rank, size = cp_group_and_rank()
    multiple = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return shard_microbatches([batch], size, rank, group, multiple=multiple, **media_kwargs(arch))[0]


def gather_logits(logits: torch.Tensor, shard, num_tokens: int) -> torch.Tensor:
    """(T_local, V) on each CP rank -> (num_tokens, V) in pack order (every CP rank gets it)."""
    parts = [torch.empty_like(logits) for _ in range(shard.cp_size)]
    dist.all_gather(parts, logits.contiguous(), group=shard.group)
    idx = [torch.empty_like(shard.index) for _ in range(shard.cp_size)]
    dist.all_gather(idx, shard.index.contiguous(), group=shard.group)
    index, rows = torch.cat(idx), torch.cat(parts)
    out = logits.new_zeros((num_tokens, logits.shape[1]))
    real = index >= 0
    out[index[real]] = rows[real]
    return out


def _case_batches(arch, cases, tp: int, cp: int):
    from mllm_mega.models import registry

    pack_hf_batch = registry.spec_of(arch).pack_hf_batch
    for name, inp in cases.items():
        ids, pos, cu, _ = pack_hf_batch(arch, inp["input_ids"], inp.get("attention_mask"), inp.get("image_grid_thw"),
                                        inp.get("video_grid_thw"), inp.get("second_per_grid_ts"),
                                        pad_to_multiple=tp if cp == 1 else 1)
        yield name, {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu,
                     **{k: inp[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                            "video_grid_thw") if k in inp}}


def _grads(load, arch, cases, *, tp: int, cp: int, kernels: str) -> dict[str, torch.Tensor]:
    """Gradients of sum(logits * R) over every case (R: fixed N(0,1) per packed token and vocab entry),
    summed over the CP group."""
    from megatron.core import parallel_state as ps

    from mllm_mega.models import registry
    from mllm_mega.models.layout import ParallelLayout
    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training import checkpointing as ckpt

    initialize_distributed(tp, 1, context_parallel_size=cp)
    model = registry.spec_of(arch).build_stage(arch, ParallelLayout(tp, 1), kernels=kernels)
    ckpt.load_model_weights(load, model)
    vocab_local = arch.text.vocab_size // tp
    v0 = ps.get_tensor_model_parallel_rank() * vocab_local
    for i, (_, batch) in enumerate(_case_batches(arch, cases, tp, cp)):
        num_tokens = batch["input_ids"].shape[0]
        probe = torch.randn(num_tokens, arch.text.vocab_size, generator=torch.Generator().manual_seed(i))
        probe = probe[:, v0:v0 + vocab_local]
        if cp > 1:
            batch = shard_for_rank(batch, arch, model.config)
            index = batch["context_parallel"].index
            probe = torch.where((index >= 0)[:, None], probe[index.clamp(min=0)], torch.zeros(()))
        batch = {k: v.cuda() if torch.cuda.is_available() and isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        logits = model(batch["input_ids"], batch["position_ids"], batch["cu_seqlens"],
                       pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                       pixel_values_videos=batch.get("pixel_values_videos"),
                       video_grid_thw=batch.get("video_grid_thw"), context_parallel=batch.get("context_parallel"))
        (logits.float() * probe.to(logits.device)).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if getattr(p, "sequence_parallel", False) and tp > 1:  # norms under SP: each TP rank saw part of the
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())  # tokens (finalize_model_grads' job)
        if cp > 1:
            dist.all_reduce(g, group=ps.get_context_parallel_group())
        grads[name] = g.detach().float().cpu().clone()
    return grads


def compare_cp_grads(load, arch, cases, *, tp: int, cp: int, kernels: str = "torch") -> tuple[float, float]:
    """(max abs difference, max abs gradient) of every parameter gradient at CP vs CP=1 (same TP), over
    all ranks. Collective; re-initialises megatron's groups (CP, then CP=1)."""
    if cp < 2:
        raise ValueError("--check-grads compares CP > 1 with CP=1: pass --cp 2 or more")
    if dist.get_world_size() % (tp * cp):
        raise ValueError(f"world size {dist.get_world_size()} is not divisible by TP={tp} x CP={cp}")
    at_cp = _grads(load, arch, cases, tp=tp, cp=cp, kernels=kernels)
    at_one = _grads(load, arch, cases, tp=tp, cp=1, kernels=kernels)
    if set(at_cp) != set(at_one):
        raise ValueError(f"parameters differ between CP={cp} and CP=1: {sorted(set(at_cp) ^ set(at_one))[:5]}")
    diffs = {k: (at_cp[k] - at_one[k]).abs().max().item() for k in at_cp}
    worst = max(diffs.values())
    if worst > 1e-4:
        print(f"[verify] largest gradient differences: {sorted(diffs.items(), key=lambda kv: -kv[1])[:4]}")
    scale = max(at_one[k].abs().max().item() for k in at_one)
    result = torch.tensor([worst, scale], dtype=torch.float64)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return float(result[0]), float(result[1])


def verify_grads(load: str, *, tp: int, cp: int, inputs_path: str | None = None,
                 kernels: str = "torch") -> tuple[float, float]:
    """``verify --check-grads``: :func:`compare_cp_grads` on verify's inputs (``--inputs`` or its cases)."""
    import os

    from mllm_mega.models import registry
    from mllm_mega.training import checkpointing as ckpt

    arch = registry.arch_from_hf_config(ckpt.read_meta(load)["hf_config"])
    if inputs_path:
        if not os.path.isfile(inputs_path):
            raise FileNotFoundError(f"--inputs {inputs_path!r} not found")
        cases = {"inputs": torch.load(inputs_path, weights_only=False)}
    else:
        cases = registry.spec_of(arch).verify_inputs(arch)
    return compare_cp_grads(load, arch, cases, tp=tp, cp=cp, kernels=kernels)
