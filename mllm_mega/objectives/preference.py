"""Preference objectives over chosen/rejected pairs: sigmoid DPO, BCO quality, SFT generation (DPO / MPO).

Per pair, with completion log-prob sums ``logp(y|x)`` (summed over the completion's label tokens) and the
frozen reference's: ``r = logp_policy - logp_ref``, rewards ``beta * r``.

- preference (sigmoid DPO; Rafailov et al. 2023, TRL DPOTrainer ``loss_type="sigmoid"``):
  ``-log sigmoid(beta * (r_chosen - r_rejected))``.
- quality (BCO; TRL DPOTrainer ``loss_type="bco_pair"`` as InternVL's MPO code uses it):
  ``-log sigmoid(beta * r_chosen - delta) - log sigmoid(-(beta * r_rejected - delta))`` with ``delta`` the
  running mean of batch-mean rewards. TRL's ``RunningMoments`` (InternVL) is updated with each batch's
  ``mean(cat(beta r_chosen, beta r_rejected))``, gathered over processes, and includes the current batch.
  Here the batch mean is over all pairs of the global batch (sums all-reduced over DP ranks), and the delta
  a step uses is the mean over the *previous* steps (0 at the first): the current batch's rewards are only
  known after every micro-batch's forward, while 1F1B runs the first backward before the last forward, and
  a delta that changed between micro-batches would make the loss depend on the split. At step 1 with the
  policy equal to the reference both deltas are 0.
- generation (SFT on the chosen completion): ``sum w_i * (-log p(label_i))`` over the chosen completions'
  tokens divided by the global sum of their weights ``w`` (the pack's loss_weights, i.e. data.loss_reweighting;
  the default ``token`` makes it a token mean over the whole global batch). InternVL takes the token mean per
  micro-batch (then averages micro-batches), which changes with the split; this does not.

Normalisation: the preference and quality terms are means over all pairs of the global batch (the pair count
all-reduced before the forward, like next_token's weight sum); every micro-batch contributes its sums divided
by those global counts, so the loss is the same however the global batch is split into micro-batches or DP
ranks. MPO (InternVL2.5-MPO): 0.8 / 0.2 / 1.0.

Reference: ``resident`` (a frozen model run under no_grad in the same forward step, on the same micro-batch)
or ``precomputed`` (``ref_logps`` (P, 2) per micro-batch, looked up by pair key in ``collate``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mllm_mega.objectives.logprobs import segment_ids, segment_logps, token_logps
from mllm_mega.objectives.next_token import run_model

IGNORE = -100


def pair_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, delta: float):
    """(P,) log-prob sums -> float64 rewards (chosen, rejected) and per-pair preference and quality losses."""
    rc = beta * (policy_chosen.double() - ref_chosen.double())
    rr = beta * (policy_rejected.double() - ref_rejected.double())
    preference = -F.logsigmoid(rc - rr)
    quality = -F.logsigmoid(rc - delta) - F.logsigmoid(-(rr - delta))
    return rc, rr, preference, quality


def generation_weights(mb: dict) -> torch.Tensor:
    """(T,) float64: the loss weight of each supervised token of a chosen completion, 0 elsewhere."""
    num_tokens = mb["labels"].shape[0]
    chosen = torch.zeros(int(mb["cu_seqlens"].numel()) - 1, dtype=torch.bool)
    chosen[mb["pair_segments"][:, 0].long()] = True
    on = chosen[segment_ids(mb["cu_seqlens"].cpu(), num_tokens)] & (mb["labels"].cpu() != IGNORE)
    return torch.where(on, mb["loss_weights"].cpu().double(), torch.zeros((), dtype=torch.float64))


class PreferenceObjective:
    name = "preference"
    sum_keys = ("preference_sum", "quality_sum", "generation_sum", "chosen_reward_sum", "rejected_reward_sum",
                "correct")

    def __init__(self, *, beta: float = 0.1, weights=(1.0, 0.0, 0.0), reference_model=None, ref_table=None,
                 ref_path: str | None = None):
        if (reference_model is None) == (ref_table is None):
            raise ValueError("PreferenceObjective: give exactly one of reference_model (resident) and ref_table "
                             "(precomputed)")
        self.beta, self.weights = float(beta), tuple(float(w) for w in weights)
        self.reference_model, self.ref_table, self.ref_path = reference_model, ref_table, ref_path
        self.delta_sum, self.delta_count = 0.0, 0  # BCO: sum and number of the previous steps' batch means

    @property
    def delta(self) -> float:
        return self.delta_sum / self.delta_count if self.delta_count else 0.0

    def collate(self, packs: list[dict]) -> dict:
        from mllm_mega.training.step import concat_packs

        mb = concat_packs(packs)
        if "pair_segments" not in mb:
            raise ValueError("objective.name=preference needs preference packs (with pair_segments and pair_keys); "
                             "the data gave plain packs")
        if self.ref_table is not None:
            rows = []
            for key in mb["pair_keys"]:
                if key not in self.ref_table:
                    raise KeyError(f"{self.ref_path or 'reference log-probs'}: no entry for pair {key!r}; recompute "
                                   "the file for this dataset (tools/precompute_ref_logps.py)")
                rows.append(self.ref_table[key])
            mb["ref_logps"] = torch.tensor(rows, dtype=torch.float32).reshape(-1, 2)  # (P, 2): chosen, rejected
        return mb

    def normalisers(self, microbatches: list[dict], dp_group) -> dict:
        local = torch.tensor([sum(int(mb["pair_segments"].shape[0]) for mb in microbatches),
                              sum(float(generation_weights(mb).sum()) for mb in microbatches)], dtype=torch.float64)
        dist.all_reduce(local, group=dp_group)
        return {"num_pairs": float(local[0]), "generation_weight": float(local[1]), "delta": self.delta}

    def forward_step(self, model, mb: dict, norms: dict, *, kernels: str, tp_group, inject_nan: bool = False):
        logits = run_model(model, mb)
        pairs = mb["pair_segments"].long()
        if self.reference_model is not None:  # resident: same micro-batch, no graph, no gradients
            with torch.no_grad():
                ref_seg = segment_logps(run_model(self.reference_model, mb), mb["labels"], mb["cu_seqlens"],
                                        kernels=kernels, tp_group=tp_group)
            ref = torch.stack([ref_seg[pairs[:, 0]], ref_seg[pairs[:, 1]]], dim=1)
        else:
            ref = mb["ref_logps"]
        num_pairs, gen_weight = norms["num_pairs"], norms["generation_weight"]
        w_pref, w_qual, w_gen = self.weights
        gen_w = generation_weights(mb).to(logits.device)

        def loss_func(output):
            tok = token_logps(output, mb["labels"], kernels=kernels, tp_group=tp_group)  # (T,)
            seg = torch.zeros(int(mb["cu_seqlens"].numel()) - 1, dtype=torch.float32, device=tok.device).index_add(
                0, segment_ids(mb["cu_seqlens"].to(tok.device), tok.shape[0]), tok)  # (S,) completion sums
            chosen, rejected = seg[pairs[:, 0]], seg[pairs[:, 1]]
            rc, rr, pref, qual = pair_losses(chosen, rejected, ref[:, 0].to(seg.device), ref[:, 1].to(seg.device),
                                             beta=self.beta, delta=norms["delta"])
            gen = -(tok.double() * gen_w).sum()
            loss = (w_pref * pref.sum() / num_pairs + w_qual * qual.sum() / num_pairs
                    + (w_gen * gen / gen_weight if gen_weight > 0 else 0.0 * gen))
            if inject_nan:
                loss = loss * float("nan")
            sums = {"preference_sum": pref.sum(), "quality_sum": qual.sum(), "generation_sum": gen,
                    "chosen_reward_sum": rc.sum(), "rejected_reward_sum": rr.sum(),
                    "correct": (rc > rr).double().sum()}
            sums = {k: v.detach().double() * (float("nan") if inject_nan else 1.0) for k, v in sums.items()}
            return loss.float(), torch.zeros((), dtype=torch.int), sums

        return logits, loss_func

    def metrics(self, sums: dict, norms: dict) -> dict:
        p, n = norms["num_pairs"], norms["generation_weight"]
        if p == 0:
            raise ValueError("preference objective: the global batch has no pairs")
        w_pref, w_qual, w_gen = self.weights
        terms = {"loss_preference": sums["preference_sum"] / p, "loss_quality": sums["quality_sum"] / p,
                 "loss_generation": sums["generation_sum"] / n if n > 0 else 0.0}
        chosen, rejected = sums["chosen_reward_sum"] / p, sums["rejected_reward_sum"] / p
        loss = w_pref * terms["loss_preference"] + w_qual * terms["loss_quality"] + w_gen * terms["loss_generation"]
        return {"loss": loss, "weight_sum": p, **terms, "rewards_chosen": chosen, "rewards_rejected": rejected,
                "rewards_margin": chosen - rejected, "rewards_accuracy": sums["correct"] / p,
                "bco_delta": norms["delta"], "batch_mean_reward": (chosen + rejected) / 2}

    def end_step(self, metrics: dict, skipped: bool) -> None:
        if not skipped and math.isfinite(metrics["batch_mean_reward"]):
            self.delta_sum += metrics["batch_mean_reward"]
            self.delta_count += 1

    def state_dict(self) -> dict:
        return {"delta_sum": self.delta_sum, "delta_count": self.delta_count}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint of a run that started as another objective has no delta yet
        self.delta_sum, self.delta_count = float(state.get("delta_sum", 0.0)), int(state.get("delta_count", 0))
