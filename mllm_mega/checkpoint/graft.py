"""Vision-encoder grafting (InternVL2.5-style progressive scaling): the ViT of one checkpoint, the LLM of another.

* ViT (patch embedding, blocks) from ``--vision-from`` A, LLM (embeddings, decoder, head) from ``--llm-from`` B.
* Patch merger: taken whole from A when its output width equals B's LLM width. Otherwise its norm and first
  linear layer come from A and the output projection ``fc2`` (merged_size -> B's width) is re-initialised:
  weight ~ N(0, initializer_range^2) (B's ``text_config.initializer_range``, default 0.02), bias 0, from a
  ``torch.Generator`` seeded with ``seed`` - to be trained in the alignment stage.
* Config: B's (text config, special token ids, tying) with A's ``vision_config``, whose merger output width
  (``out_hidden_size`` for Qwen2.5-VL, ``hidden_size`` for Qwen2-VL) is set to B's LLM width.
* hf_extra: the image/video processor files from A (they describe the ViT's input), the rest (tokenizer,
  chat template, generation config) from B. Meta ``source_dtype`` from B.

Both checkpoints must be of the same family (the ViT type and the processor depend on it).
"""
from __future__ import annotations

import os

import torch

from mllm_mega.checkpoint.io import (
    HF_EXTRA, check_out, copy_hf_extra, load_full_state, resolve_checkpoint, save_full_state, staged_output,
)
from mllm_mega.models.registry import arch_from_hf_config, family_of_hf_config
from mllm_mega.models.registry import spec_of as registry_spec_of

PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
MERGER_OUT = ("vision.merger.fc2.weight", "vision.merger.fc2.bias")


def grafted_hf_config(vision_cfg: dict, llm_cfg: dict) -> dict:
    """B's config with A's vision_config, its merger output width set to B's LLM width (the family's rule)."""
    return family_of_hf_config(vision_cfg).graft_hf_config(vision_cfg, llm_cfg)


def graft_vision(vision_from: str, llm_from: str, out: str, *, seed: int = 0) -> dict:
    """Write the grafted checkpoint ``out`` (iteration 0, model only). Returns a summary dict."""
    a = resolve_checkpoint(vision_from, "--vision-from")
    b = resolve_checkpoint(llm_from, "--llm-from")
    if a.arch.family != b.arch.family:
        raise ValueError(f"--vision-from {vision_from!r} is {a.arch.family} but --llm-from {llm_from!r} is "
                         f"{b.arch.family}; grafting needs two checkpoints of the same family")
    if registry_spec_of(a.arch).graft_hf_config is None:
        raise ValueError(f"--vision-from {vision_from!r}: family {a.arch.family} has no vision tower to graft")
    check_out(out)
    cfg = grafted_hf_config(a.meta["hf_config"], b.meta["hf_config"])
    arch = arch_from_hf_config(cfg)  # validates the combination
    keep_merger = a.arch.vision.out_hidden_size == b.arch.text.hidden_size

    sa, sb = load_full_state(a), load_full_state(b)
    state = {k: v for k, v in sa.items() if k.startswith("vision.")}
    state.update({k: v for k, v in sb.items() if k.startswith("language_model.")})
    if not keep_merger:
        text_cfg = b.meta["hf_config"].get("text_config") or b.meta["hf_config"]
        std = float(text_cfg.get("initializer_range", b.meta["hf_config"].get("initializer_range", 0.02)))
        merged_size = state["vision.merger.fc1.weight"].shape[0]
        gen = torch.Generator().manual_seed(seed)
        state[MERGER_OUT[0]] = torch.randn(arch.text.hidden_size, merged_size, generator=gen) * std
        state[MERGER_OUT[1]] = torch.zeros(arch.text.hidden_size)
    summary = {
        "vision_from": os.path.abspath(a.root), "llm_from": os.path.abspath(b.root),
        "merger": "kept" if keep_merger else f"fc2 re-initialised (N(0, {std}^2), seed {seed})",
    }
    meta = {"hf_config": cfg, "source_dtype": b.meta.get("source_dtype", "float32"), "graft": summary}
    with staged_output(out, ".graft-") as tmp:
        save_full_state(tmp, meta, state)
        copy_hf_extra(b.root, tmp, [n for n in _extra_names(b.root) if n not in PROCESSOR_FILES])
        copy_hf_extra(a.root, tmp, list(PROCESSOR_FILES))
    return summary


def _extra_names(root: str) -> list[str]:
    path = os.path.join(root, HF_EXTRA)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
