"""Tiny random source directories of the Open-Qwen2VL composition (nothing is downloaded), for tests and CPU demos:

* :func:`write_tiny_siglip_dir`: a ``SiglipVisionModel`` (``full=False``) or a full ``SiglipModel`` (``full=True``,
  with a text tower the composition ignores) HF directory: width 48, 3 blocks, 2 heads of head_dim 24, 28x28
  images in 4x4 patches (a 7x7 grid; the real model: 384x384, 14x14 patches, 27x27), GELU-tanh as SigLIP;
* :func:`write_tiny_qwen2_dir`: a ``Qwen2ForCausalLM`` directory (width 64, GQA 4/2, biases on q/k/v as Qwen2)
  with the shapes dataset's byte-level BPE tokenizer (:func:`mllm_mega.data.synthetic.train_tokenizer`);
  ``vocab_size=None`` sizes the embedding to the tokenizer exactly (so adding ``<image>`` grows it);
  ``qwen_vision_tokens=False`` renames its ``<|image_pad|>`` (an older Qwen2 tokenizer has no vision tokens).

Norms and biases are randomised (HF initialises them to 1 / 0) so parity tests see every parameter.
"""
from __future__ import annotations

import os

import torch

TINY_LLM_VOCAB = 512


def tiny_siglip_vision_config_dict(**overrides) -> dict:
    cfg = {"hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 3, "num_attention_heads": 2,
           "image_size": 28, "patch_size": 4, "num_channels": 3, "hidden_act": "gelu_pytorch_tanh",
           "layer_norm_eps": 1e-6, "vision_use_head": True}
    cfg.update(overrides)
    return cfg


def _randomise_norms(model, seed: int):
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def write_tiny_siglip_dir(path: str, *, seed: int = 0, full: bool = False, **overrides) -> str:
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    vision = tiny_siglip_vision_config_dict(**overrides)
    torch.manual_seed(seed)
    if full:
        text = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
                "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 0}
        model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    _randomise_norms(model.eval(), seed).save_pretrained(path)
    return path


def write_tiny_qwen2_dir(path: str, *, seed: int = 1, hidden_size: int = 64, tie: bool = False,
                         vocab_size: int | None = TINY_LLM_VOCAB, dtype: torch.dtype = torch.float32,
                         qwen_vision_tokens: bool = True) -> str:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from mllm_mega.data.synthetic import train_tokenizer

    texts = ["a red circle on the left", "two blue squares at the top", "what colour is the shape?"] * 20
    train_tokenizer(texts, path, vocab_size=400)  # (re)creates the directory: first
    if not qwen_vision_tokens:
        for name in os.listdir(path):
            with open(os.path.join(path, name)) as f:
                text = f.read()
            with open(os.path.join(path, name), "w") as f:
                f.write(text.replace("<|image_pad|>", "<|picture|>"))
    cfg = Qwen2Config(vocab_size=vocab_size or len(AutoTokenizer.from_pretrained(path)), hidden_size=hidden_size,
                      intermediate_size=112, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=None,
                      eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    _randomise_norms(Qwen2ForCausalLM(cfg).eval(), seed).to(dtype).save_pretrained(path)
    return path
