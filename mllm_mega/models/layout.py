"""How a model is split and recomputed: the family-independent half of building a stage.

:class:`ParallelLayout` (TP/PP sizes, sequence parallelism, LLM layers on the first stage) and
:class:`Recompute` (megatron-core's activation recomputation, per tower) are read by every family's
``to_transformer_configs``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelLayout:
    """How the model is split: tensor/pipeline parallel sizes and the LLM layers on the first stage."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = True  # in the LLM, when TP > 1
    num_llm_layers_in_first_stage: int | None = None  # None = even split


RECOMPUTE_GRANULARITIES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class Recompute:
    """Activation recomputation of one tower, as megatron-core's ``recompute_*`` TransformerConfig fields.

    ``selective`` = megatron's ``core_attn`` recompute: megatron's ``SelfAttention`` checkpoints its
    ``core_attention`` slot, which here is our RoPE + packed attention, re-run in the backward (megatron's other
    selective modules are not offered: ``mlp`` recurses in the backward on the ViT's biased MLP, whose
    checkpoint returns the fc2 bias parameter itself; ``layernorm`` needs Transformer Engine).
    ``full`` re-runs whole layers: ``uniform`` = every layer, checkpointed in chunks of ``num_layers``;
    ``block`` = only the first ``num_layers`` layers of each pipeline stage (of the ViT for the vision tower).
    """

    granularity: str = "none"
    method: str = "uniform"
    num_layers: int = 1

    def __post_init__(self):
        for name, value, choices in (("granularity", self.granularity, RECOMPUTE_GRANULARITIES),
                                     ("method", self.method, RECOMPUTE_METHODS)):
            if value not in choices:
                raise ValueError(f"recompute {name}={value!r}; expected one of {choices}")
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"recompute num_layers must be a positive int, got {self.num_layers!r}")


def _recompute_kwargs(r: Recompute | None, num_local_layers: int, where: str) -> dict:
    if r is None or r.granularity == "none":
        return {}
    if r.granularity == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if r.num_layers > num_local_layers or (r.method == "uniform" and num_local_layers % r.num_layers):
        raise ValueError(f"{where}: recompute num_layers={r.num_layers} with method {r.method!r} does not fit "
                         f"{num_local_layers} layers per stage (uniform needs a divisor, block at most that many)")
    return {"recompute_granularity": "full", "recompute_method": r.method, "recompute_num_layers": r.num_layers}
