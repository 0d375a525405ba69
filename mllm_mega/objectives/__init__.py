"""Training objectives: what the training step asks of the loss (training/step.py's ``train_step``).

An objective supplies, in this order within one optimizer step:

- ``collate(packs) -> micro-batch``: the packs of one micro-batch joined (training/step.py's ``concat_packs``)
  plus whatever the objective carries in the batch (e.g. precomputed reference log-probs);
- ``normalisers(microbatches, dp_group) -> dict``: the global denominators, all-reduced over data-parallel
  ranks before any forward pass, so the loss does not depend on how the global batch is split;
- ``forward_step(model, mb, norms, *, kernels, tp_group, inject_nan) -> (output, loss_func)``: megatron's
  forward-step contract (``loss_func(output) -> (loss, num_tokens, {sum_key: 0-dim float64})``);
- ``sum_keys``: the per-micro-batch sums that ``train_step`` adds over micro-batches and ranks, and
  ``metrics(sums, norms) -> dict`` (with ``loss`` and ``weight_sum``) turns them into the logged metrics;
- ``end_step(metrics, skipped)``, ``state_dict()`` / ``load_state_dict()``: running state kept across steps
  (saved in checkpoints so a resume continues exactly).

``build_objective`` is the one place that maps ``cfg.objective.name`` to a class.
"""
from __future__ import annotations


def build_objective(cfg, *, reference_model=None):
    """The objective of a run config; ``reference_model``: the resident frozen reference (preference only)."""
    if cfg.objective.name == "next_token":
        from mllm_mega.objectives.next_token import NextTokenObjective

        return NextTokenObjective()
    from mllm_mega.objectives.preference import PreferenceObjective

    o = cfg.objective
    table = None
    if o.reference == "precomputed":
        from mllm_mega.objectives.ref_logps import read_ref_logps

        table = read_ref_logps(o.ref_logps)
    return PreferenceObjective(beta=o.beta, weights=(o.weight_preference, o.weight_quality, o.weight_generation),
                               reference_model=reference_model, ref_table=table, ref_path=o.ref_logps)
