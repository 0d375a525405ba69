"""Packed (THD) core attention with fused rotary embedding: the ``core_attention`` slot of our layer specs.

megatron-core's ``SelfAttention`` computes q/k/v and hands them to ``core_attention`` with the packing
metadata. We keep rotary embedding out of megatron (``rotary_pos_emb=None``) and apply it here from position
ids carried in :class:`PackedSeqParamsWithRope`, so the same slot serves the LLM (MRoPE, causal) and the ViT
(2D RoPE, non-causal, window/full segments chosen per layer), and one Triton kernel can fuse the angles.

Two implementations, chosen once in the layer spec (``kernels: torch | triton``):
- :class:`TorchPackedAttention`: the kernels' plain-torch fp32 specifications (``apply_rope_ref``,
  ``varlen_attention_ref``), so the CPU path and the reference are one code; used on CPU.
- :class:`TritonPackedAttention`: ``mllm_mega.kernels`` varlen attention + fused RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


@dataclass
class PackedSeqParamsWithRope(PackedSeqParams):
    """megatron's PackedSeqParams plus what our attention needs to rotate q/k.

    rope_position_ids: (C, total_tokens) int64 — C=3 (t, h, w) for MRoPE, C=2 (h, w) for the ViT.
    rope_inv_freq: (head_dim // 2,) float32 frequencies, one per rotated pair.
    rope_sections: C ints summing to head_dim // 2: frequency j uses position row c(j).
    """

    rope_position_ids: torch.Tensor | None = None
    rope_inv_freq: torch.Tensor | None = None
    rope_sections: tuple[int, ...] | None = None
    context_parallel: object = None  # context parallel: this rank's CPShard (mllm_mega/parallel/context.py)


def make_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, position_ids, inv_freq, sections,
                           context_parallel=None):
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParamsWithRope(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
        rope_position_ids=position_ids,
        rope_inv_freq=inv_freq,
        rope_sections=tuple(int(s) for s in sections),
        context_parallel=context_parallel,
    )


class _PackedAttentionBase(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        self.causal = attn_mask_type == AttnMaskType.causal
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not isinstance(packed_seq_params, PackedSeqParamsWithRope):
            raise ValueError("packed attention needs PackedSeqParamsWithRope (THD input with position ids)")
        p = packed_seq_params
        # query (T, heads_local, head_dim); key/value (T, kv_heads_local, head_dim)
        if p.context_parallel is not None:  # context parallel: rotate locally, attend over the CP-gathered K/V
            from mllm_mega.models.common.context_parallel import cp_attention

            if p.rope_position_ids is not None:
                query, key = self._rotate(query, key, p)
            out = cp_attention(query, key, value, p.context_parallel, kernels=self.kernels,
                               softmax_scale=self.softmax_scale, causal=self.causal)
            return out.reshape(out.shape[0], -1)
        out = self._attend(query, key, value, p)
        return out.reshape(out.shape[0], -1)


class TorchPackedAttention(_PackedAttentionBase):
    """Plain-torch packed attention + RoPE: the kernels' references (the CPU path)."""

    kernels = "torch"

    def _rotate(self, q, k, p):  # context parallel: the CP path rotates before its K/V all-gather
        from mllm_mega.kernels.rope import apply_rope_ref

        return (apply_rope_ref(q, p.rope_position_ids, p.rope_inv_freq, p.rope_sections),
                apply_rope_ref(k, p.rope_position_ids, p.rope_inv_freq, p.rope_sections))

    def _attend(self, q, k, v, p):
        from mllm_mega.kernels.varlen_attention import varlen_attention_ref

        if p.rope_position_ids is not None:
            q, k = self._rotate(q, k, p)
        return varlen_attention_ref(q, k, v, p.cu_seqlens_q, p.cu_seqlens_kv, p.max_seqlen_q, p.max_seqlen_kv,
                                    softmax_scale=self.softmax_scale, causal=self.causal)


class TritonPackedAttention(_PackedAttentionBase):
    """Triton varlen attention + fused RoPE from ``mllm_mega.kernels``."""

    kernels = "triton"

    def _rotate(self, q, k, p):  # context parallel: the CP path rotates before its K/V all-gather
        from mllm_mega.kernels import apply_rope

        return (apply_rope(q, p.rope_position_ids, p.rope_inv_freq, p.rope_sections),
                apply_rope(k, p.rope_position_ids, p.rope_inv_freq, p.rope_sections))

    def _attend(self, q, k, v, p):
        from mllm_mega.kernels import apply_rope, varlen_attention

        if p.rope_position_ids is not None:
            q = apply_rope(q, p.rope_position_ids, p.rope_inv_freq, p.rope_sections)
            k = apply_rope(k, p.rope_position_ids, p.rope_inv_freq, p.rope_sections)
        return varlen_attention(q, k, v, p.cu_seqlens_q, p.cu_seqlens_kv, p.max_seqlen_q, p.max_seqlen_kv,
                                softmax_scale=self.softmax_scale, causal=self.causal)
