"""Next-token prediction (pretraining / SFT): packed, reweighted cross-entropy, globally normalised.

Loss normalisation (InternVL2.5's reweighting, loss = sum(w * l) / sum(w)): the denominator is the sum of
the loss weights of the whole global batch — every micro-batch on every data-parallel rank — computed before
the forward passes, so each micro-batch contributes ``sum(w * l) / W_global`` and megatron only sums
(``calculate_per_token_loss`` disables its per-micro-batch and per-DP-rank averaging). The result does not
depend on how the global batch is split into micro-batches or ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mllm_mega.training.loss import weighted_loss_sum


def model_inputs(mb: dict) -> dict:
    """The model's keyword arguments from a micro-batch (media and, for pairs, the shared-feature indices)."""
    kwargs = {k: mb.get(k) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    kwargs["context_parallel"] = mb.get("context_parallel")
    for k in ("image_feature_index", "video_feature_index"):  # preference pairs: the ViT runs once per pair
        if mb.get(k) is not None:
            kwargs[k] = mb[k]
    return kwargs


def run_model(model, mb: dict):
    return model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"], max_seqlen=mb["max_seqlen"],
                 **model_inputs(mb))


class NextTokenObjective:
    name = "next_token"
    sum_keys = ("loss_sum",)

    def collate(self, packs: list[dict]) -> dict:
        from mllm_mega.training.step import concat_packs

        return concat_packs(packs)

    def normalisers(self, microbatches: list[dict], dp_group) -> dict:
        local_w = sum(float(mb["loss_weights"].double().sum()) for mb in microbatches)
        denom = torch.tensor([local_w], dtype=torch.float64)
        dist.all_reduce(denom, group=dp_group)
        return {"weight_sum": float(denom)}

    def forward_step(self, model, mb: dict, norms: dict, *, kernels: str, tp_group, inject_nan: bool = False):
        w_global = norms["weight_sum"]
        scale = 1.0 / w_global if w_global > 0 else 0.0
        logits = run_model(model, mb)

        def loss_func(output):
            s = weighted_loss_sum(output, mb["labels"], mb["loss_weights"], kernels=kernels, tp_group=tp_group)
            if inject_nan:
                s = s * float("nan")
            # the 0 "token count" keeps megatron from rescaling (the loss is already globally normalised)
            return s * scale, torch.zeros((), dtype=torch.int), {"loss_sum": s.detach().double()}

        return logits, loss_func

    def metrics(self, sums: dict, norms: dict) -> dict:
        w = norms["weight_sum"]
        return {"loss": sums["loss_sum"] / w if w > 0 else float("nan"), "weight_sum": w}

    def end_step(self, metrics: dict, skipped: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
