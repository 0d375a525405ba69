"""Tiny random Valley2.5-family models and their sources, for tests and CPU demos (nothing is downloaded).

* :func:`build_tiny_qwen2_vl` / :func:`build_tiny_qwen3`: the two source models ``tools/compose_model.py``
  combines (a ``Qwen2VLForConditionalGeneration`` of :mod:`mllm_mega.models.qwen2_vl.tiny`, vision head_dim
  24 — not a power of two, like the real 80 — and a ``Qwen3ForCausalLM`` with GQA 4/2 and head_dim 20 !=
  hidden / heads = 16, MRoPE section [4, 3, 3]);
* :func:`write_tiny_qwen2_vl_dir` / :func:`write_tiny_qwen3_dir` / :func:`write_tiny_sources`: them as HF
  directories with a tokenizer (the shapes dataset's byte-level BPE
  with Qwen2-VL's special tokens, :func:`mllm_mega.data.synthetic.train_tokenizer`, in the Qwen3 dir) and an
  image processor config + vision chat template (in the Qwen2-VL dir), as real hub directories have them;
* :func:`build_tiny_valley`: a ``ValleyForConditionalGeneration`` straight from tiny configs;
  :func:`write_tiny_valley_dir`: a Valley HF directory, through :func:`compose_model` (seconds).

Norms and biases are randomised (HF initialises them to 1 / 0) so parity tests see every parameter.
"""
from __future__ import annotations

import json
import os

import torch

from mllm_mega.models.qwen2_vl.tiny import build_tiny_hf_model

TINY_VOCAB = 512
TINY_TOKENIZER_VOCAB = 400  # <= TINY_VOCAB: the LLM may have more rows than the tokenizer, as real ones do


def tiny_qwen3_config_dict(*, hidden_size: int = 64, tie_word_embeddings: bool = False, **overrides) -> dict:
    cfg = {
        "vocab_size": TINY_VOCAB, "hidden_size": hidden_size, "intermediate_size": 112, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 20, "hidden_act": "silu",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def _randomise_norms(model, seed: int):
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def build_tiny_qwen3(seed: int = 0, **kwargs):
    """A random ``Qwen3ForCausalLM`` (float32, eager attention) of :func:`tiny_qwen3_config_dict`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**tiny_qwen3_config_dict(**kwargs))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return _randomise_norms(Qwen3ForCausalLM(config).eval(), seed)


def build_tiny_qwen2_vl(seed: int = 0, hidden_size: int = 64):
    """A random ``Qwen2VLForConditionalGeneration``; its merger outputs ``hidden_size``."""
    return build_tiny_hf_model("qwen2_vl", seed=seed, hidden_size=hidden_size)


def preprocessor_config(vision_config: dict) -> dict:
    """A Qwen2-VL image processor config for the tiny ViT (small images: 56x56 .. 224x224 pixels)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "size": {"shortest_edge": 56 * 56, "longest_edge": 224 * 224},
        "patch_size": vision_config["patch_size"], "temporal_patch_size": vision_config["temporal_patch_size"],
        "merge_size": vision_config["spatial_merge_size"],
    }


def write_tiny_qwen3_dir(path: str, *, seed: int = 1, hidden_size: int = 64, tie: bool = False) -> str:
    """A tiny Qwen3ForCausalLM HF directory with the shapes tokenizer (vision special tokens at ids 3-6)."""
    from mllm_mega.data.synthetic import train_tokenizer

    texts = ["a red circle on the left", "two blue squares at the top", "what colour is the shape?"] * 20
    train_tokenizer(texts, path, vocab_size=TINY_TOKENIZER_VOCAB)  # (re)creates the directory: first
    build_tiny_qwen3(seed, hidden_size=hidden_size, tie_word_embeddings=tie).save_pretrained(path)
    return path


def write_tiny_qwen2_vl_dir(path: str, *, seed: int = 0, hidden_size: int = 64) -> str:
    """A tiny Qwen2VLForConditionalGeneration HF directory with an image processor config and a chat template
    that renders image/video parts (as the hub's Qwen2-VL directories have)."""
    from mllm_mega.data.synthetic import CHAT_TEMPLATE

    vl = build_tiny_qwen2_vl(seed, hidden_size=hidden_size)
    vl.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(vl.config.vision_config.to_dict()), f, indent=2)
    with open(os.path.join(path, "chat_template.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f)
    return path


def write_tiny_sources(root: str, *, seed: int = 0, llm_hidden_size: int = 64, tie: bool = False) -> dict:
    """``root/qwen2_vl`` and ``root/qwen3`` HF directories; returns {"qwen2_vl": path, "qwen3": path}."""
    return {"qwen2_vl": write_tiny_qwen2_vl_dir(os.path.join(root, "qwen2_vl"), seed=seed),
            "qwen3": write_tiny_qwen3_dir(os.path.join(root, "qwen3"), seed=seed + 1, hidden_size=llm_hidden_size,
                                          tie=tie)}


def tiny_valley_config(*, position_mode: str = "mrope", tie_word_embeddings: bool = False, hidden_size: int = 64):
    """A ValleyConfig of the tiny shapes, with the shapes tokenizer's special-token ids."""
    from mllm_mega.data.synthetic import SPECIAL_TOKENS
    from mllm_mega.models.families.valley.hf.configuration_valley import ValleyConfig

    from mllm_mega.models.qwen2_vl.tiny import tiny_hf_config_dict

    vision = tiny_hf_config_dict("qwen2_vl", hidden_size=hidden_size)["vision_config"]
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    config = ValleyConfig(
        vision_config=vision,
        text_config=tiny_qwen3_config_dict(hidden_size=hidden_size, tie_word_embeddings=tie_word_embeddings),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        position_mode=position_mode, tie_word_embeddings=tie_word_embeddings,
    )
    config._attn_implementation = "eager"
    return config


def build_tiny_valley(seed: int = 0, **kwargs):
    """A random ``ValleyForConditionalGeneration`` (float32, eager attention) of :func:`tiny_valley_config`."""
    from mllm_mega.models.families.valley.hf.modeling_valley import ValleyForConditionalGeneration

    torch.manual_seed(seed)
    return _randomise_norms(ValleyForConditionalGeneration(tiny_valley_config(**kwargs)).eval(), seed)


def write_tiny_valley_dir(out: str, *, seed: int = 0, position_mode: str = "mrope", tie: bool = False) -> str:
    """A Valley HF directory composed from tiny random sources (written next to ``out``, then removed)."""
    import shutil
    import tempfile

    from mllm_mega.models.families.valley.compose import compose_model

    parent = os.path.dirname(os.path.abspath(out))
    src = tempfile.mkdtemp(prefix=".tiny-valley-src-", dir=parent)
    try:
        dirs = write_tiny_sources(src, seed=seed, tie=tie)
        compose_model(dirs["qwen2_vl"], dirs["qwen3"], out, position_mode=position_mode, progress=False)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return out
