"""One optimizer step: micro-batches through megatron's pipeline schedule, globally normalised loss, NaN guard.

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

from mllm_mega.training.loss import weighted_loss_sum

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
               inject_nan_grad: bool = False, arch=None):
    """Forward/backward over ``microbatches`` (this DP rank's share) and, unless NaN/Inf, the optimizer step.

    Returns a dict: loss (global weighted mean, on every rank), weight_sum (global), grad_norm, skipped (bool).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = ddp_model.config
    if ps.get_context_parallel_world_size() > 1:  # context parallel: this rank's slice of every micro-batch
        from mllm_mega.parallel.context import cp_group_and_rank, media_kwargs, shard_microbatches

        group, rank, size = cp_group_and_rank()
        microbatches = shard_microbatches(
            microbatches, size, rank, group,
            multiple=config.tensor_model_parallel_size if config.sequence_parallel else 1, **media_kwargs(arch))
    local_w = sum(float(mb["loss_weights"].double().sum()) for mb in microbatches)
    denom = torch.tensor([local_w], dtype=torch.float64)
    dist.all_reduce(denom, group=dp_group)
    w_global = float(denom)
    scale = 1.0 / w_global if w_global > 0 else 0.0
    tp_group = ps.get_tensor_model_parallel_group()
    tp = config.tensor_model_parallel_size

    def forward_step(data_iterator, model):
        mb = _to_device(next(data_iterator))
        logits = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], max_seqlen=mb["max_seqlen"],
                       pixel_values=mb.get("pixel_values"), image_grid_thw=mb.get("image_grid_thw"),
                       pixel_values_videos=mb.get("pixel_values_videos"), video_grid_thw=mb.get("video_grid_thw"),
                       context_parallel=mb.get("context_parallel"))

        def loss_func(output):
            s = weighted_loss_sum(output, mb["labels"], mb["loss_weights"], kernels=kernels,
                                  tp_group=tp_group if tp > 1 else None)
            if inject_nan:
                s = s * float("nan")
            loss = s * scale
            # the 0 "token count" keeps megatron from rescaling (the loss is already globally normalised)
            return loss, torch.zeros((), dtype=torch.int), {"loss_sum": s.detach().double()}

        return logits, loss_func

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
    stats = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        stats[0] = sum(float(x["loss_sum"]) for x in losses)
    stats[1] = 0.0 if _grads_finite(ddp_model) else 1.0
    dist.all_reduce(stats)  # sum over all ranks: loss sums of every DP rank; any non-finite grad
    loss = float(stats[0]) / w_global if w_global > 0 else float("nan")
    if not math.isfinite(loss) or stats[1] > 0:
        optimizer.zero_grad()
        return {"loss": loss, "weight_sum": w_global, "grad_norm": float("nan"), "skipped": True}
    ok, grad_norm, _ = optimizer.step()
    if grad_norm is None:
        grad_norm = optimizer.get_grad_norm()
    return {"loss": loss, "weight_sum": w_global, "grad_norm": float(grad_norm), "skipped": not ok}


def _grads_finite(ddp_model) -> bool:
    for buffer in list(ddp_model.buffers) + list(getattr(ddp_model, "expert_parallel_buffers", [])):
        if not torch.isfinite(buffer.grad_data).all():
            return False
    return True
