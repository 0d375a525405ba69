"""The ``objective`` section of a run config: which loss the training step optimises, and its knobs.

Presets and their sources: ``dpo`` is sigmoid DPO (Rafailov et al. 2023, TRL's ``loss_type="sigmoid"``);
``mpo`` is InternVL2.5-MPO's mix (0.8 preference + 0.2 quality + 1.0 generation); ``dpo_bco`` is Valley2.5's
DPO + BCO without the SFT term (the report gives no ratio: equal weights here, overridable).
"""
from __future__ import annotations

from dataclasses import dataclass


def _choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# preset -> (weight_preference, weight_quality, weight_generation)
OBJECTIVE_PRESETS = {
    "dpo": (1.0, 0.0, 0.0),      # sigmoid DPO (Rafailov et al. 2023)
    "mpo": (0.8, 0.2, 1.0),      # InternVL2.5-MPO: preference + quality (BCO) + generation (SFT on chosen)
    "dpo_bco": (1.0, 1.0, 0.0),  # Valley2.5: DPO + BCO, no SFT term
}


@dataclass
class ObjectiveConfig:
    """What the training step optimises: next-token prediction or a preference objective (mllm_mega/objectives)."""

    name: str = "next_token"
    """next_token (the SFT / pretraining loss) | preference (DPO / MPO / DPO+BCO over chosen-rejected pairs)."""
    preset: str = "dpo"
    """Preference only: dpo | mpo | dpo_bco; fills the three weights that are left unset."""
    beta: float = 0.1
    """Preference only: the KL coefficient; rewards are beta * (logp_policy - logp_ref) of a completion."""
    weight_preference: float | None = None
    """Weight of the sigmoid-DPO term; None = the preset's."""
    weight_quality: float | None = None
    """Weight of the BCO quality term; None = the preset's."""
    weight_generation: float | None = None
    """Weight of the SFT term on the chosen completions; None = the preset's."""
    reference: str = "resident"
    """resident (a frozen copy of the starting model beside the policy, run in the same step; needs pp=1) |
    precomputed (per-pair reference log-probs read from ref_logps; tools/precompute_ref_logps.py)."""
    ref_logps: str | None = None
    """precomputed only: the reference log-prob file; None = tools/precompute_ref_logps.py's default path,
    ``ref_logps.ref.json`` beside the data's first shard."""
    reference_from: str | None = None
    """resident only: the reference's checkpoint; None = model.init_from (the policy's starting weights)."""

    def __post_init__(self):
        _choice("objective.name", self.name, ("next_token", "preference"))
        _choice("objective.preset", self.preset, tuple(OBJECTIVE_PRESETS))
        _choice("objective.reference", self.reference, ("resident", "precomputed"))
        for name, value in zip(("weight_preference", "weight_quality", "weight_generation"),
                               OBJECTIVE_PRESETS[self.preset]):
            if getattr(self, name) is None:
                setattr(self, name, value)
            if not getattr(self, name) >= 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        if not self.beta > 0:
            raise ValueError(f"objective.beta must be > 0, got {self.beta}")
        if self.name == "preference":
            if self.weight_preference + self.weight_quality + self.weight_generation == 0:
                raise ValueError("objective: weight_preference, weight_quality and weight_generation are all 0")
