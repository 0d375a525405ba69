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
    table, path = None, None
    if o.reference == "precomputed":
        from mllm_mega.objectives.ref_logps import open_ref_logps

        path = ref_logps_path(cfg)
        # refuses a file made from another reference checkpoint or other data (names the key and both values)
        table = open_ref_logps(path, load=o.reference_from or cfg.model.init_from, data_cfg=cfg.data)
    return PreferenceObjective(beta=o.beta, weights=(o.weight_preference, o.weight_quality, o.weight_generation),
                               reference_model=reference_model, ref_table=table, ref_path=path)


def ref_logps_path(cfg) -> str:
    """objective.ref_logps, or where tools/precompute_ref_logps.py writes by default (beside the data)."""
    if cfg.objective.ref_logps:
        return cfg.objective.ref_logps
    import os

    from mllm_mega.objectives.ref_logps import data_shards, default_ref_logps_path

    return default_ref_logps_path(os.path.dirname(os.path.abspath(data_shards(cfg.data)[0])))


def build_resident_reference(cfg, spec, arch, layout, *, kernels: str, dtype, policy):
    """The resident reference: this rank's stage in the policy's layout, frozen (no grads, never in the
    optimizer), loaded from objective.reference_from or model.init_from; with neither, a copy of ``policy``'s
    current (initial) weights."""
    import torch

    from mllm_mega.training.checkpointing import load_model_weights

    source = cfg.objective.reference_from or cfg.model.init_from
    ref = spec.build_stage(arch, layout, kernels=kernels, params_dtype=dtype)
    with torch.no_grad():
        if source:
            load_model_weights(source, ref)
        else:
            ref.load_state_dict(policy.state_dict(), strict=True)
    ref.requires_grad_(False)
    return ref.eval()
