"""megatron-core layer specs for our towers (Qwen2-VL-style ViTs, Qwen2 / Qwen3 LLMs).

Implementations are swapped by changing a slot here (``kernels``: torch | triton), never inside model code:
``core_attention`` (packed varlen attention + fused RoPE) and the norms.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mllm_mega.models.common.attention import TorchPackedAttention, TritonPackedAttention
from mllm_mega.models.common.kernel_choice import KERNEL_CHOICES, resolve_kernels  # noqa: F401
from mllm_mega.models.common.norm import TorchLayerNorm, TorchRMSNorm, TritonRMSNorm


def layer_spec(*, causal: bool, norm: str, kernels: str = "torch", qk_norm: bool = False) -> ModuleSpec:
    """A transformer layer: norm -> packed self-attention -> residual -> norm -> MLP -> residual.

    ``qk_norm`` (Qwen3): RMSNorm over head_dim of every query and key head, before RoPE, in megatron's
    ``q_layernorm`` / ``k_layernorm`` slots (the names megatron's finalize_model_grads looks for)."""
    kernels = resolve_kernels(kernels)
    attention = TritonPackedAttention if kernels == "triton" else TorchPackedAttention
    if norm == "rmsnorm":
        norm_cls = TritonRMSNorm if kernels == "triton" else TorchRMSNorm
    elif norm == "layernorm":
        norm_cls = TorchLayerNorm
    else:
        raise ValueError(f"norm={norm!r}; expected rmsnorm or layernorm")
    # q/k norms act on whole-sequence activations of local heads (not sequence-split): their TP grad sum comes
    # from megatron's qk_layernorm rule, not from the sequence-parallel flag
    qk_norm_spec = ModuleSpec(module=norm_cls, params={"sequence_parallel_grad": False})
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_cls,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=attention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm_spec if qk_norm else IdentityOp,
                    k_layernorm=qk_norm_spec if qk_norm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_cls,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
