"""Valley2.5 family: Qwen2-VL NaViT vision tower + 2x2 patch merger + Qwen3 LLM (HF side in ``hf/``)."""
