"""Family-agnostic checkpoint tooling, reaching each family through :mod:`mllm_mega.models.registry`.

- :mod:`.io`: whole-model (TP=1, PP=1) access to mllm_mega dist checkpoints, staged (temp + rename) output.
- :mod:`.hf_io`: lazy reading of HF safetensors directories (single or sharded).
- :mod:`.convert`: ``import-hf`` and ``verify`` (logits against transformers at any TP/PP).
- :mod:`.export`: the HF safetensors writer (``export-hf``), ``reshard`` and ``roundtrip``.
- :mod:`.merge`: linear / TIES weight merging; :mod:`.graft`: a ViT of one checkpoint on the LLM of another.
"""
