"""One optimizer step: micro-batches through megatron's pipeline schedule, globally normalised loss, NaN guard.

The objective (mllm_mega/objectives: next-token, preference) supplies the forward step and loss function that
megatron's schedule runs (Megatron-Bridge's pluggable ``forward_step_func``); this file owns what every
objective shares: the schedule, the NaN guard and the optimizer step.

Loss normalisation (InternVL2.5's reweighting, loss = sum(w * l) / sum(w)): the denominator is the sum of
the loss weights of the whole global batch — every micro-batch on every data-parallel rank — computed before
the forward passes, so each micro-batch contributes ``sum(w * l) / W_global`` and megatron only sums
(``calculate_per_token_loss`` disables its per-micro-batch and per-DP-rank averaging). The result does not
depend on how the global batch is split into micro-batches or ranks.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

_CAT_KEYS = ("input_ids", "labels", "loss_weights")
_VISION = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


def concat_packs(packs: list[dict]) -> dict:
    """Concatenate packed sequences into one THD micro-batch (segments keep attention isolated)."""
    if len(packs) == 1:
        return packs[0]
    out = {k: torch.cat([p[k] for p in packs]) for k in _CAT_KEYS}
    out["position_ids"] = torch.cat([p["position_ids"] for p in packs], dim=1)
    cus, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for p in packs:
        cus.append(p["cu_seqlens"][1:] + offset)
        offset += int(p["input_ids"].shape[0])
    out["cu_seqlens"] = torch.cat(cus)
    out["max_seqlen"] = max(int(p["max_seqlen"]) for p in packs)
    for pv, grid in _VISION + (("second_per_grid_ts", None),):
        have = [p[pv] for p in packs if p.get(pv) is not None]
        if have:
            out[pv] = torch.cat(have)
            if grid:
                out[grid] = torch.cat([p[grid] for p in packs if p.get(pv) is not None])
    for k in ("num_real_tokens", "num_samples", "num_images", "num_videos"):
        out[k] = sum(int(p.get(k, 0)) for p in packs)
    out["sample_keys"] = [key for p in packs for key in p.get("sample_keys", [])]
    if any("pair_segments" in p for p in packs):
        _concat_pairs(packs, out)
    return out


def _concat_pairs(packs: list[dict], out: dict):
    """Preference packs (data/preference.py): each pair keeps pointing at its own segments and feature rows."""
    pairs, segments_before = [], 0
    for p in packs:
        if "pair_segments" not in p:
            raise ValueError("concat_packs: a pack without pair_segments among preference packs")
        pairs.append(p["pair_segments"] + segments_before)
        segments_before += int(p["cu_seqlens"].numel()) - 1
    out["pair_segments"] = torch.cat(pairs)
    out["pair_keys"] = [key for p in packs for key in p["pair_keys"]]
    for index_key, grid in (("image_feature_index", "image_grid_thw"), ("video_feature_index", "video_grid_thw")):
        pieces, rows_before = [], 0
        for p in packs:
            if index_key in p:
                pieces.append(p[index_key] + rows_before)
                # every feature row of a pair's media is used by its placeholders, so this is the row count
                rows_before += int(p[index_key].max()) + 1 if p[index_key].numel() else 0
            elif p.get(grid) is not None and p[grid].numel():
                raise ValueError(f"concat_packs: a preference pack with {grid} but no {index_key}")
        if pieces:
            out[index_key] = torch.cat(pieces)


def _to_device(batch: dict) -> dict:
    if not torch.cuda.is_available():
        return batch
    return {k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(ddp_model, optimizer, microbatches: list[dict], *, kernels: str, dp_group, inject_nan: bool = False,
               inject_nan_grad: bool = False, arch=None, objective=None):
    """Forward/backward over ``microbatches`` (this DP rank's share) and, unless NaN/Inf, the optimizer step.

    ``objective`` (mllm_mega/objectives; None = next-token) supplies the forward step, the loss and the metrics.
    Returns a dict: loss (global, on every rank), weight_sum (the objective's global normaliser), grad_norm,
    skipped (bool), plus the objective's metrics.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if objective is None:
        from mllm_mega.objectives.next_token import NextTokenObjective

        objective = NextTokenObjective()
    config = ddp_model.config
    if ps.get_context_parallel_world_size() > 1:  # context parallel: this rank's slice of every micro-batch
        from mllm_mega.parallel.context import cp_group_and_rank, media_kwargs, shard_microbatches

        group, rank, size = cp_group_and_rank()
        microbatches = shard_microbatches(
            microbatches, size, rank, group,
            multiple=config.tensor_model_parallel_size if config.sequence_parallel else 1, **media_kwargs(arch))
    # the global normalisers (all-reduced over DP), before any forward: no dependence on the micro-batch split
    norms = objective.normalisers(microbatches, dp_group)
    tp_group = ps.get_tensor_model_parallel_group() if config.tensor_model_parallel_size > 1 else None

    def forward_step(data_iterator, model):
        return objective.forward_step(model, _to_device(next(data_iterator)), norms, kernels=kernels,
                                      tp_group=tp_group, inject_nan=inject_nan)

    # the whole sequence: megatron's get_tensor_shapes divides the p2p length by CP and, under SP, by TP itself
    seq = microbatches[0]["input_ids"].shape[0] * ps.get_context_parallel_world_size()
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=[ddp_model],
        num_microbatches=len(microbatches), seq_length=seq, micro_batch_size=1, forward_only=False)
    # loss sums live on the last pipeline stage (identical over TP ranks): gather them everywhere
    if inject_nan_grad and dist.get_rank() == 0:  # testing aid: one rank's gradient only, the loss stays finite
        ddp_model.buffers[0].grad_data.view(-1)[0] = float("nan")
    keys = objective.sum_keys
    stats = torch.zeros(len(keys) + 1, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for i, key in enumerate(keys):
            stats[i] = sum(float(x[key]) for x in losses)
    stats[-1] = 0.0 if _grads_finite(ddp_model) else 1.0
    dist.all_reduce(stats)  # sum over all ranks: loss sums of every DP rank; any non-finite grad
    out = objective.metrics({k: float(stats[i]) for i, k in enumerate(keys)}, norms)
    loss = out["loss"]
    if not math.isfinite(loss) or stats[-1] > 0:
        optimizer.zero_grad()
        return {**out, "grad_norm": float("nan"), "skipped": True}
    ok, grad_norm, _ = optimizer.step()
    if grad_norm is None:
        grad_norm = optimizer.get_grad_norm()
    objective.end_step(out, skipped=not ok)
    return {**out, "grad_norm": float(grad_norm), "skipped": not ok}


def _grads_finite(ddp_model) -> bool:
    for buffer in list(ddp_model.buffers) + list(getattr(ddp_model, "expert_parallel_buffers", [])):
        if not torch.isfinite(buffer.grad_data).all():
            return False
    return True
