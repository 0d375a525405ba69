"""Tiny random Open-Qwen2VL-family models (``LlavaForConditionalGeneration`` with SigLIP + Qwen2), for tests and
CPU runs; nothing is downloaded. The SigLIP tower has head_dim 24 (48 wide, 2 heads: not a power of two, like
the real 1152 / 16 = 72, and splittable over TP=2), 42 px images of 14 px patches (a 3 x 3 grid); the Qwen2 LLM
has GQA (4 query / 2 KV heads). Norms, biases and embeddings are randomised so parity sees every parameter.
"""
from __future__ import annotations

import torch

TINY_VOCAB = 512
# the shapes tokenizer's special tokens (mllm_mega.data.synthetic.SPECIAL_TOKENS): vision start/end, image, video
TINY_IDS = {"vision_start_token_id": 3, "vision_end_token_id": 4, "image_token_id": 5, "video_token_id": 6}


def tiny_config(*, tie_word_embeddings: bool = False, projector_pool_grid: int | None = None,
                vision_overrides: dict | None = None, **text_overrides) -> dict:
    """A tiny LLaVA config.json dict; ``text_overrides`` replace text_config keys (the projector follows the
    LLM's ``hidden_size``), ``vision_overrides`` vision_config keys (``num_heads``, as the other families name
    it, is SigLIP's ``num_attention_heads``); ``projector_pool_grid``: k (k x k tokens per image)."""
    vision_overrides = dict(vision_overrides or {})
    if "num_heads" in vision_overrides:
        vision_overrides["num_attention_heads"] = vision_overrides.pop("num_heads")
    vision = {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 80,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_channels": 3, "image_size": 42,
              "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
              "vision_use_head": False, **vision_overrides}
    text = {"model_type": "qwen2", "vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 112,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": tie_word_embeddings, "bos_token_id": None, "eos_token_id": 2, **text_overrides}
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": vision,
           "text_config": text, "image_token_index": TINY_IDS["image_token_id"],
           "video_token_id": TINY_IDS["video_token_id"], "vision_start_token_id": TINY_IDS["vision_start_token_id"],
           "vision_end_token_id": TINY_IDS["vision_end_token_id"], "vision_feature_layer": -1,
           "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
           "multimodal_projector_bias": True, "tie_word_embeddings": tie_word_embeddings, "dtype": "float32"}
    grid = vision["image_size"] // vision["patch_size"]
    cfg["image_seq_length"] = grid * grid
    if projector_pool_grid is not None:
        cfg["projector_pool_grid"] = projector_pool_grid
    return cfg


def hf_config_object(cfg: dict):
    """The transformers ``LlavaConfig`` of a config dict (eager attention)."""
    from transformers import LlavaConfig

    config = LlavaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "eager"
    return config


def build_tiny_hf_model(seed: int = 0, **kwargs):
    """A random ``LlavaForConditionalGeneration`` (fp32, eager) of :func:`tiny_config`."""
    from transformers import LlavaForConditionalGeneration

    if kwargs.get("projector_pool_grid") not in (None, 42 // 14):
        raise ValueError("a LlavaForConditionalGeneration cannot pool: projector_pool_grid must be the patch grid")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config_object(tiny_config(**kwargs))).eval()
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: randomise them so parity sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model
