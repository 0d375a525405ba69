"""Compose the starting checkpoint of a Valley2.5-family model from a Qwen2-VL and a Qwen3 HF directory.

``compose_model(vision_from, llm_from, out)`` writes a Valley HF directory (see
``hf/modeling_valley.py`` for the model and its tensor names) loadable with
``AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)``:

* ``visual.*`` (patch embedding, blocks, merger) from the Qwen2-VL directory (``Qwen2VLForConditionalGeneration``;
  its LLM is not used). The merger comes whole when its output width (``vision_config.hidden_size``) equals
  the Qwen3 hidden size. Otherwise ``ln_q`` and ``mlp.0`` are kept and the output projection ``mlp.2``
  (merged width -> Qwen3 width) is re-initialised: weight ~ N(0, std^2) with std = the Qwen3 config's
  ``initializer_range`` (0.02 when absent), bias 0, drawn from ``torch.Generator().manual_seed(seed)`` —
  to be trained in the projector stage; ``vision_config.hidden_size`` becomes the Qwen3 width.
* ``model.*`` and ``lm_head.weight`` from the Qwen3 directory (``Qwen3ForCausalLM``); no ``lm_head`` when
  ``tie_word_embeddings``.
* ``config.json``: a ``ValleyConfig`` (Qwen2-VL ``vision_config``, the Qwen3 config as ``text_config``,
  ``position_mode``, ``mrope_section``) with ``auto_map`` and the token ids of ``<|image_pad|>``,
  ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>`` read from the Qwen3 ``tokenizer.json``. Those four
  must be single tokens there with ids inside the Qwen3 vocabulary (real Qwen3 tokenizers have them, at
  151652-151656); a tokenizer without them is refused — the LLM's embedding rows are what the ids index,
  so they are not invented here.
* ``configuration_valley.py`` + ``modeling_valley.py`` (the remote code), every tokenizer file of the Qwen3
  directory, ``generation_config.json`` from the Qwen3 directory, and the Qwen2-VL directory's
  ``preprocessor_config.json`` / ``video_preprocessor_config.json`` / ``processor_config.json`` and its chat
  chat template (``chat_template.jinja`` or the ``chat_template`` of ``chat_template.json``, which renders
  image and video parts), written as ``chat_template.jinja`` so the tokenizer and the processor both use it; it
  replaces Qwen3's text-only one when present.
* weights in ``model-0000i-of-0000n.safetensors`` + index, in the Qwen3 weights' dtype unless ``dtype``.

The output is written under ``.compose-*`` next to ``out`` and renamed when complete; any error (missing
directory, wrong model type, missing / corrupt / wrong-shape tensors, tokenizer without the vision tokens,
non-empty ``out``) raises FileNotFoundError / FileExistsError / KeyError / ValueError naming the path, key or
tensor, and leaves nothing at ``out``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import ExitStack

import torch
from tqdm import tqdm

from mllm_mega.checkpoint.hf_io import parse_size, read_donor_config

HF_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
CODE_FILES = ("configuration_valley.py", "modeling_valley.py")
AUTO_MAP = {
    "AutoConfig": "configuration_valley.ValleyConfig",
    "AutoModelForImageTextToText": "modeling_valley.ValleyForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_valley.ValleyForConditionalGeneration",
}
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
MERGER_OUT = ("visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Weights:
    """The tensors of a HF directory by on-disk name (transformers-5 ``model.visual.`` /
    ``model.language_model.`` prefixes normalised to ``visual.`` / ``model.``)."""

    def __init__(self, path: str, flag: str, stack: ExitStack):
        from safetensors import safe_open

        index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{flag} {index}: not a safetensors index ({e!r})") from None
        elif os.path.isfile(single):
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{flag} {path!r}: neither model.safetensors nor model.safetensors.index.json")
        self.where = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{flag} {file}: listed in the index but missing")
            try:
                handle = stack.enter_context(safe_open(file, framework="pt"))
            except Exception as e:  # safetensors raises its own error type on a bad header / truncated file
                raise ValueError(f"{flag} {file}: unreadable safetensors file ({e})") from None
            for key in handle.keys():
                self.where[_normalize(key)] = (handle, key, file)
        self.flag = flag

    def get(self, key: str) -> torch.Tensor:
        handle, raw, file = self.where[key]
        try:
            return handle.get_tensor(raw)
        except Exception as e:
            raise ValueError(f"{self.flag} {file}: tensor {raw!r} unreadable ({e})") from None

    def dtype(self) -> torch.dtype:
        if not self.where:
            raise ValueError(f"{self.flag}: the weights hold no tensor")
        return self.get(next(iter(self.where))).dtype


def _normalize(key: str) -> str:
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def _token_ids(llm_from: str, vocab_size: int) -> dict:
    path = os.path.join(llm_from, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--llm-from {llm_from!r} has no tokenizer.json (needed for the ids of "
                                f"{', '.join(VISION_TOKENS.values())})")
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"--llm-from {path}: unreadable tokenizer ({e})") from None
    ids = {}
    for key, token in VISION_TOKENS.items():
        i = tok.token_to_id(token)
        if i is None:
            raise ValueError(f"--llm-from {path}: the tokenizer has no {token!r} token; Valley needs "
                             f"{', '.join(VISION_TOKENS.values())} as single tokens (real Qwen3 tokenizers have "
                             "them; add them to the tokenizer and resize the embeddings first)")
        if i >= vocab_size:
            raise ValueError(f"--llm-from {path}: {token!r} has id {i}, outside the Qwen3 vocabulary "
                             f"(vocab_size {vocab_size})")
        ids[key] = i
    return ids


def valley_config_dict(vision_cfg: dict, llm_cfg: dict, token_ids: dict, position_mode: str,
                       mrope_section=None) -> dict:
    """config.json of the composed model (validated by building a ValleyConfig from it)."""
    from mllm_mega.models.families.valley.hf.configuration_valley import ValleyConfig

    vision = copy.deepcopy(vision_cfg["vision_config"])
    text = {k: v for k, v in llm_cfg.items() if k not in ("architectures", "transformers_version", "auto_map")}
    vision["hidden_size"] = text["hidden_size"]  # the merger's output width
    try:
        config = ValleyConfig(vision_config=vision, text_config=text, position_mode=position_mode,
                              mrope_section=mrope_section, tie_word_embeddings=bool(text.get("tie_word_embeddings")),
                              **token_ids)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the composed config is invalid: {e}") from None
    out = config.to_dict()
    out["architectures"] = ["ValleyForConditionalGeneration"]
    out["auto_map"] = dict(AUTO_MAP)
    out["dtype"] = text.get("dtype") or text.get("torch_dtype") or "float32"
    return out


def expected_shapes(config_dict: dict) -> dict[str, tuple]:
    """Every tensor the Valley model of ``config_dict`` has, with its shape (built on the meta device)."""
    from mllm_mega.models.families.valley.hf.configuration_valley import ValleyConfig
    from mllm_mega.models.families.valley.hf.modeling_valley import ValleyForConditionalGeneration

    cfg = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map", "model_type")}
    with torch.device("meta"):
        model = ValleyForConditionalGeneration(ValleyConfig(**cfg))
    names = {n for n, _ in model.named_parameters()}  # tied lm_head is not a separate parameter
    return {n: tuple(p.shape) for n, p in model.state_dict().items() if n in names}


def _write_weights(tmp: str, items, dtype: torch.dtype, max_shard_bytes: int, progress: bool) -> int:
    from safetensors.torch import save_file

    shards, current, size, total = [], {}, 0, 0
    for key, tensor in tqdm(items, desc="compose", unit="tensor", disable=not progress):
        t = tensor.to(dtype=dtype).contiguous().clone()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size, total = t, size + nbytes, total + nbytes
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return total


def _copy_files(src: str, dst: str, names) -> list[str]:
    copied = []
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _vision_chat_template(vision_from: str) -> str | None:
    """The Qwen2-VL directory's chat template (renders image/video parts), or None."""
    jinja, js = (os.path.join(vision_from, n) for n in ("chat_template.jinja", "chat_template.json"))
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read()
    if os.path.isfile(js):
        try:
            with open(js) as f:
                return json.load(f)["chat_template"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--vision-from {js}: no 'chat_template' string ({e!r})") from None
    return None


def compose_model(vision_from: str, llm_from: str, out: str, *, position_mode: str = "mrope", seed: int = 0,
                  dtype: str | None = None, max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> dict:
    """Write the Valley HF directory ``out``; returns a summary dict (see the module docstring)."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    vision_cfg = read_donor_config(vision_from, "--vision-from", "qwen2_vl", "a Qwen2-VL directory "
                              "(Qwen2VLForConditionalGeneration)")
    llm_cfg = read_donor_config(llm_from, "--llm-from", "qwen3", "a Qwen3 directory (Qwen3ForCausalLM)")
    if not isinstance(vision_cfg.get("vision_config"), dict):
        raise ValueError(f"--vision-from {vision_from!r}: config.json has no 'vision_config' object")
    token_ids = _token_ids(llm_from, int(llm_cfg.get("vocab_size", 0)))
    config = valley_config_dict(vision_cfg, llm_cfg, token_ids, position_mode)
    shapes = expected_shapes(config)
    merged_width = vision_cfg["vision_config"]["hidden_size"]
    keep_merger = merged_width == config["text_config"]["hidden_size"]

    with ExitStack() as stack:
        vis = _Weights(vision_from, "--vision-from", stack)
        llm = _Weights(llm_from, "--llm-from", stack)
        extra = sorted(k for k in llm.where if k not in shapes and not (k == "lm_head.weight" and
                                                                        config["tie_word_embeddings"]))
        if extra:
            raise ValueError(f"--llm-from {llm_from!r}: unexpected tensor(s) {extra[:5]} for a Qwen3ForCausalLM of "
                             "this config.json")
        extra = sorted(k for k in vis.where if k.startswith("visual.") and k not in shapes)
        if extra:
            raise ValueError(f"--vision-from {vision_from!r}: unexpected vision tensor(s) {extra[:5]}")
        out_dtype = DTYPES[dtype] if dtype else llm.dtype()
        std = float(llm_cfg.get("initializer_range", 0.02))
        gen = torch.Generator().manual_seed(seed)

        def items():
            for key, shape in shapes.items():
                if not keep_merger and key in MERGER_OUT:
                    t = torch.randn(shape, generator=gen) * std if key.endswith("weight") else torch.zeros(shape)
                else:
                    src = vis if key.startswith("visual.") else llm
                    if key not in src.where:
                        raise KeyError(f"{src.flag} {vision_from if src is vis else llm_from!r}: missing tensor "
                                       f"{key!r}")
                    t = src.get(key)
                    if tuple(t.shape) != shape:
                        raise ValueError(f"{src.flag}: tensor {key!r} has shape {tuple(t.shape)}, the config "
                                         f"needs {shape}")
                yield key, t

        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".compose-", dir=parent)
        try:
            total = _write_weights(tmp, items(), out_dtype, max_shard_bytes, progress)
            config["dtype"] = str(out_dtype).replace("torch.", "")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            _copy_files(HF_CODE_DIR, tmp, CODE_FILES)
            tok_files = _copy_files(llm_from, tmp, TOKENIZER_FILES + ("generation_config.json",))
            vis_files = _copy_files(vision_from, tmp, PROCESSOR_FILES)
            template = _vision_chat_template(vision_from)
            if template is not None:
                with open(os.path.join(tmp, "chat_template.jinja"), "w") as f:
                    f.write(template)
                vis_files.append("chat_template.jinja")
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {
        "merger": "kept" if keep_merger else
        f"mlp.2 re-initialised (output width {merged_width} -> {config['text_config']['hidden_size']}: "
        f"N(0, {std}^2), bias 0, seed {seed})",
        "num_tensors": len(shapes), "bytes": total, "dtype": config["dtype"], "position_mode": position_mode,
        "token_ids": token_ids, "files_from_llm": tok_files, "files_from_vision": vis_files,
    }


def compose_from_options(vision_from: str, llm_from: str, out: str, *, position_mode: str = "mrope", seed: int = 0,
                         dtype: str | None = None, max_shard_size: str = "5GB", progress: bool = True) -> dict:
    """The family's ``FamilySpec.compose_hf``: :func:`compose_model` with the shard size as text ('5GB')."""
    return compose_model(vision_from, llm_from, out, position_mode=position_mode, seed=seed, dtype=dtype,
                         max_shard_bytes=parse_size(max_shard_size), progress=progress)
