"""The HF <-> mllm_mega key map of the open_qwen2vl family (``LlavaForConditionalGeneration``: SigLIP + Qwen2).

HF side: the names transformers 5 writes on disk: ``vision_tower.{embeddings,encoder,post_layernorm}.*``,
``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*``, ``language_model.lm_head.weight``. Also
accepted on input (:func:`normalize_hf_key`): the hub's older ``vision_tower.vision_model.*`` and the in-memory
names (``model.vision_tower[.vision_model].*``, ``model.multi_modal_projector.*``, ``model.language_model.*``,
``lm_head.*``). Our side: the full (TP=1, PP=1) parameter names of the VisionLanguageModel.

Layout changes: SigLIP's separate q/k/v projections become megatron's fused ``linear_qkv`` (heads interleaved
per query group: [q, k, v] of each head, SigLIP having as many KV heads as query heads); the patch Conv2d
(stride = kernel) is a Linear over the flattened (channel, row, col) patch; the LLM's as in
:func:`mllm_mega.models.llms.qwen.llm_key_pairs`.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from mllm_mega.models.llms.qwen import llm_key_pairs, qkv_from_megatron, qkv_to_megatron

_PREFIXES = (  # (accepted prefix, on-disk prefix), most specific first
    ("model.vision_tower.vision_model.", "vision_tower."), ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
)


def normalize_hf_key(key: str) -> str:
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def hf_key_is_known(key: str) -> bool:
    return normalize_hf_key(key).startswith(("vision_tower.", "multi_modal_projector.", "language_model."))


def vision_key_pairs(vision, *, ours: str = "vision.", hf: str = "vision_tower."):
    """(our key, [HF keys], kind) of the SigLIP tower (``vision``: a SiglipVisionArch), projector excluded."""
    pairs = []
    pairs += [(f"{ours}patch_embed.weight", [f"{hf}embeddings.patch_embedding.weight"], "patch"),
              (f"{ours}patch_embed.bias", [f"{hf}embeddings.patch_embedding.bias"], "copy"),
              (f"{ours}position_embedding.weight", [f"{hf}embeddings.position_embedding.weight"], "copy")]
    for i in range(vision.num_layers):
        h, o = f"{hf}encoder.layers.{i}.", f"{ours}layers.{i}."
        for p in ("weight", "bias"):
            pairs += [
                (f"{o}input_layernorm.{p}", [f"{h}layer_norm1.{p}"], "copy"),
                (f"{o}self_attention.linear_qkv.{p}", [f"{h}self_attn.{x}_proj.{p}" for x in "qkv"], "vqkv"),
                (f"{o}self_attention.linear_proj.{p}", [f"{h}self_attn.out_proj.{p}"], "copy"),
                (f"{o}pre_mlp_layernorm.{p}", [f"{h}layer_norm2.{p}"], "copy"),
                (f"{o}mlp.linear_fc1.{p}", [f"{h}mlp.fc1.{p}"], "copy"),
                (f"{o}mlp.linear_fc2.{p}", [f"{h}mlp.fc2.{p}"], "copy"),
            ]
    pairs += [(f"{ours}post_layernorm.{p}", [f"{hf}post_layernorm.{p}"], "copy") for p in ("weight", "bias")]
    return pairs


def key_map(arch):
    """(our key, [HF keys], kind) for every parameter; kinds: copy | patch | vqkv | qkv_split | glu."""
    pairs = vision_key_pairs(arch.vision)
    for lin in ("linear_1", "linear_2"):
        for p in ("weight", "bias") if arch.vision.projector_bias else ("weight",):
            pairs.append((f"vision.merger.{lin}.{p}", [f"multi_modal_projector.{lin}.{p}"], "copy"))
    pairs += llm_key_pairs(arch.text, hf="language_model.model.", lm_head="language_model.lm_head.weight")
    return pairs


def hf_to_ours(arch, get: Callable[[str], torch.Tensor], expected_shapes: dict | None = None, *,
               pairs: list | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (our key, tensor) from HF tensors fetched with ``get(hf_key)``; ``expected_shapes`` (our key ->
    shape) turns a shape mismatch into an error naming the HF tensor(s); ``pairs``: a part of the key map
    (default: all of it)."""
    v, t = arch.vision, arch.text
    for ours, hf_keys, kind in pairs if pairs is not None else key_map(arch):
        tensors = [get(k) for k in hf_keys]
        if kind == "patch":
            out = tensors[0].reshape(tensors[0].shape[0], -1)
        elif kind == "vqkv":
            out = qkv_to_megatron(*tensors, v.num_heads, v.num_heads)
        elif kind == "qkv_split":
            out = qkv_to_megatron(*tensors, t.num_heads, t.num_kv_heads)
        elif kind == "glu":
            out = torch.cat(tensors, dim=0)
        else:
            out = tensors[0]
        want = (expected_shapes or {}).get(ours)
        if want is not None and tuple(out.shape) != tuple(want):
            shapes = ", ".join(f"{k} {tuple(x.shape)}" for k, x in zip(hf_keys, tensors))
            raise ValueError(f"HF tensor(s) {shapes} give shape {tuple(out.shape)} for {ours}, expected "
                             f"{tuple(want)} from config.json")
        yield ours, out


def ours_to_hf(arch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF on-disk key, tensor) from our full tensors fetched with ``get(our_key)``."""
    v, t = arch.vision, arch.text
    for ours, hf_keys, kind in key_map(arch):
        x = get(ours)
        if kind == "patch":
            outs = [x.reshape(v.hidden_size, v.in_channels, v.patch_size, v.patch_size)]
        elif kind == "vqkv":
            outs = list(qkv_from_megatron(x, v.num_heads, v.num_heads))
        elif kind == "qkv_split":
            outs = list(qkv_from_megatron(x, t.num_heads, t.num_kv_heads))
        elif kind == "glu":
            outs = list(torch.chunk(x, 2, dim=0))
        else:
            outs = [x]
        for k, o in zip(hf_keys, outs):
            yield k, o.contiguous()
