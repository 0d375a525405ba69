"""Tiny Qwen2-VL / Qwen2.5-VL configurations with random weights, for tests and the CPU demo.

The shapes keep what matters for parity: a vision head_dim that is not a power of two (24, like the
real models' 80), GQA in the LLM, window attention with full-attention layers (Qwen2.5-VL), untied or tied
embeddings. Nothing is downloaded.
"""
from __future__ import annotations

import copy

# Token ids of the special tokens in the tiny vocabulary (mirrors the layout of the real tokenizer, where
# the special tokens sit at the end of the vocabulary).
TINY_VOCAB = 512
TINY_SPECIAL = {
    "vision_start_token_id": 500,
    "vision_end_token_id": 501,
    "image_token_id": 502,
    "video_token_id": 503,
    "bos_token_id": 504,
    "eos_token_id": 505,
}


def tiny_hf_config_dict(family: str = "qwen2_5_vl", *, tie_word_embeddings: bool = False,
                        vision_overrides: dict | None = None, **text_overrides):
    """A config.json dict for a tiny model of ``family`` ("qwen2_5_vl" or "qwen2_vl").

    ``text_overrides`` replace text_config keys (a new ``hidden_size`` also gets a matching MRoPE section
    unless ``rope_parameters`` is given); ``vision_overrides`` replace vision_config keys.
    """
    text = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
        "bos_token_id": TINY_SPECIAL["bos_token_id"],
        "eos_token_id": TINY_SPECIAL["eos_token_id"],
    }
    text.update(text_overrides)
    if "hidden_size" in text_overrides and "rope_parameters" not in text_overrides:
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        hw = half * 3 // 8  # the real models' split: [16, 24, 24] for head_dim 128
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [half - 2 * hw, hw, hw]}
    if family == "qwen2_5_vl":
        vision = {
            "depth": 4,
            "hidden_size": 48,
            "intermediate_size": 72,
            "num_heads": 2,
            "out_hidden_size": text["hidden_size"],
            "hidden_act": "silu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
            "in_channels": 3,
        }
        arch = "Qwen2_5_VLForConditionalGeneration"
    elif family == "qwen2_vl":
        vision = {
            "depth": 3,
            "embed_dim": 48,
            "hidden_size": text["hidden_size"],
            "mlp_ratio": 2,
            "num_heads": 2,
            "hidden_act": "quick_gelu",
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        }
        arch = "Qwen2VLForConditionalGeneration"
    else:
        raise ValueError(f"unknown family {family!r}; expected 'qwen2_5_vl' or 'qwen2_vl'")
    vision.update(vision_overrides or {})
    return {
        "architectures": [arch],
        "model_type": family,
        "text_config": copy.deepcopy(text),
        "vision_config": vision,
        "tie_word_embeddings": tie_word_embeddings,
        **TINY_SPECIAL,
    }


def build_tiny_hf_model(family: str = "qwen2_5_vl", seed: int = 0, **kwargs):
    """A randomly initialised HF model (float32, eager attention) of the tiny config."""
    import torch
    import transformers

    cfg_dict = tiny_hf_config_dict(family, **kwargs)
    config_cls = transformers.AutoConfig.for_model(cfg_dict["model_type"]).__class__
    config = config_cls(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model_cls = getattr(transformers, cfg_dict["architectures"][0])
    model = model_cls(config).eval()
    # HF initialises norms to 1 and biases to 0: randomise them so parity tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model
