"""The one HF <-> mllm_mega key map for Qwen2-VL / Qwen2.5-VL, used by the converter and the checkpointer.

HF side: the names on disk (hub checkpoints, what transformers saves): ``visual.*``, ``model.*``, ``lm_head``.
transformers 5.x in-memory names (``model.visual.*``, ``model.language_model.*``) are accepted on input.
Our side: the full (TP=1, PP=1) parameter names of :class:`~mllm_mega.models.vlm.VisionLanguageModel`;
megatron's sharded state dict takes care of splitting them over TP/PP.

Layout changes: megatron's fused QKV interleaves heads per query group ([q of the group, k, v] for each KV
head); the SwiGLU ``linear_fc1`` is [gate; up]; the ViT patch Conv3d (stride = kernel) is a Linear over the
flattened patch.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from mllm_mega.models.llms.qwen import llm_key_pairs, qkv_from_megatron, qkv_to_megatron  # noqa: F401
from mllm_mega.models.qwen2_vl.configuration import ModelArch


def normalize_hf_key(key: str) -> str:
    """Map transformers-5 in-memory names to the on-disk names."""
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


# ---- the map -------------------------------------------------------------------------------------------
def _vision_layer_pairs(arch: ModelArch, i: int):
    """(ours, [hf keys], kind) for one ViT block. kind: 'copy' | 'qkv_fused' | 'glu'."""
    hf = f"visual.blocks.{i}."
    ours = f"vision.layers.{i}."
    bias_norm = arch.vision.norm == "layernorm"
    pairs = []
    for n_hf, n_ours in (("norm1", "input_layernorm"), ("norm2", "pre_mlp_layernorm")):
        pairs.append((f"{ours}{n_ours}.weight", [f"{hf}{n_hf}.weight"], "copy"))
        if bias_norm:
            pairs.append((f"{ours}{n_ours}.bias", [f"{hf}{n_hf}.bias"], "copy"))
    for p in ("weight", "bias"):
        pairs.append((f"{ours}self_attention.linear_qkv.{p}", [f"{hf}attn.qkv.{p}"], "qkv_fused"))
        pairs.append((f"{ours}self_attention.linear_proj.{p}", [f"{hf}attn.proj.{p}"], "copy"))
        if arch.vision.gated_mlp:
            pairs.append((f"{ours}mlp.linear_fc1.{p}", [f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}"], "glu"))
            pairs.append((f"{ours}mlp.linear_fc2.{p}", [f"{hf}mlp.down_proj.{p}"], "copy"))
        else:
            pairs.append((f"{ours}mlp.linear_fc1.{p}", [f"{hf}mlp.fc1.{p}"], "copy"))
            pairs.append((f"{ours}mlp.linear_fc2.{p}", [f"{hf}mlp.fc2.{p}"], "copy"))
    return pairs


def key_map(arch: ModelArch):
    """List of (our key, [HF keys], kind) covering every parameter of the model (full, TP=1/PP=1)."""
    pairs = [("vision.patch_embed.weight", ["visual.patch_embed.proj.weight"], "patch")]
    for i in range(arch.vision.depth):
        pairs += _vision_layer_pairs(arch, i)
    pairs.append(("vision.merger.ln_q.weight", ["visual.merger.ln_q.weight"], "copy"))
    if arch.vision.norm == "layernorm":
        pairs.append(("vision.merger.ln_q.bias", ["visual.merger.ln_q.bias"], "copy"))
    for p in ("weight", "bias"):
        pairs.append((f"vision.merger.fc1.{p}", [f"visual.merger.mlp.0.{p}"], "copy"))
        pairs.append((f"vision.merger.fc2.{p}", [f"visual.merger.mlp.2.{p}"], "copy"))
    pairs += llm_key_pairs(arch.text)
    return pairs


def hf_to_ours(arch: ModelArch, get: Callable[[str], torch.Tensor], expected_shapes: dict | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our key, tensor) from HF tensors fetched with ``get(hf_key)`` (raises KeyError if missing).

    ``expected_shapes`` (our key -> shape) turns shape mismatches into errors naming the HF tensor.
    """
    v, t = arch.vision, arch.text
    for ours, hf_keys, kind in key_map(arch):
        tensors = [get(k) for k in hf_keys]
        if kind == "copy":
            out = tensors[0]
        elif kind == "patch":
            out = tensors[0].reshape(tensors[0].shape[0], -1)
        elif kind == "glu":
            out = torch.cat(tensors, dim=0)
        elif kind == "qkv_fused":
            q, k, vv = torch.chunk(tensors[0], 3, dim=0)
            out = qkv_to_megatron(q, k, vv, v.num_heads, v.num_heads)
        elif kind == "qkv_split":
            out = qkv_to_megatron(*tensors, t.num_heads, t.num_kv_heads)
        else:  # pragma: no cover
            raise AssertionError(kind)
        if expected_shapes is not None and ours in expected_shapes:
            if tuple(out.shape) != tuple(expected_shapes[ours]):
                shapes = ", ".join(f"{k} {tuple(x.shape)}" for k, x in zip(hf_keys, tensors))
                raise ValueError(
                    f"HF tensor(s) {shapes} give shape {tuple(out.shape)} for {ours}, expected "
                    f"{tuple(expected_shapes[ours])} from config.json"
                )
        yield ours, out


def ours_to_hf(arch: ModelArch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF on-disk key, tensor) from our full tensors fetched with ``get(our_key)``."""
    v, t = arch.vision, arch.text
    patch_shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    for ours, hf_keys, kind in key_map(arch):
        x = get(ours)
        if kind == "copy":
            outs = [x]
        elif kind == "patch":
            outs = [x.reshape(patch_shape)]
        elif kind == "glu":
            outs = list(torch.chunk(x, 2, dim=0))
        elif kind == "qkv_fused":
            outs = [torch.cat(qkv_from_megatron(x, v.num_heads, v.num_heads), dim=0)]
        elif kind == "qkv_split":
            outs = list(qkv_from_megatron(x, t.num_heads, t.num_kv_heads))
        else:  # pragma: no cover
            raise AssertionError(kind)
        for k, o in zip(hf_keys, outs):
            yield k, o.contiguous()


def hf_key_pattern_is_known(key: str) -> bool:
    return bool(re.match(r"^(visual\.|model\.|lm_head\.)", normalize_hf_key(key)))
