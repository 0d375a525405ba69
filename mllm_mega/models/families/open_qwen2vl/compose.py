"""Compose the starting checkpoint of the Open-Qwen2VL recipe from a SigLIP and a Qwen2 HF directory.

``compose_model(vision_from, llm_from, out)`` writes a ``LlavaForConditionalGeneration`` directory (the HF
format of the family; loads with ``AutoModelForImageTextToText.from_pretrained(out)``, no remote code):

* the vision tower: the SigLIP vision transformer of ``vision_from`` — a ``SiglipVisionModel`` directory
  (``model_type: siglip_vision_model``) or a full ``SiglipModel`` one (``model_type: siglip``; its text tower
  is not used) — with its **last encoder block dropped** (SigLIP-SO400M: 27 -> 26 blocks) and no pooling head
  (``vision_use_head: false``), read with ``vision_feature_layer: -1`` and ``vision_feature_select_strategy:
  full`` (all 729 patches, no CLS to crop). transformers' LLaVA takes ``hidden_states[-1]`` of the tower, and
  SigLIP's ``hidden_states`` are captured with ``tie_last_hidden_states=False``: the raw output of the last
  kept block, without ``post_layernorm`` (transformers 5 ``utils/output_capturing.py``). That is what
  Open-Qwen2VL trains on: prismatic's ``TimmViTBackbone`` sets the featurizer to timm's
  ``get_intermediate_layers(n={len(blocks) - 2})`` — the output of the second-to-last block, the final norm
  not applied (``norm=False``) (``prismatic/models/backbones/vision/base_vision.py`` of the Open-Qwen2VL
  code). The tower's ``post_layernorm`` weights are kept (transformers' ``SiglipVisionModel`` has them) but
  take no part in the features. The layout follows llava-interleave-qwen (SigLIP truncated to 26 layers,
  feature layer -1, strategy full, no head).
* the projector ``multi_modal_projector.linear_1`` (SigLIP width -> Qwen2 width) / ``linear_2`` (Qwen2 width
  -> Qwen2 width), GELU between: new, initialised as ``torch.nn.Linear``'s default (which prismatic's
  projector gets): weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn in float32 from
  ``torch.Generator().manual_seed(seed)`` in the order linear_1.weight, linear_1.bias, linear_2.weight,
  linear_2.bias. The adaptive-average pooling of the family (27x27 -> 12x12 = 144 tokens in pretraining) has
  no weights; this HF model is the 729-token (SFT) form.
* the LLM and ``lm_head`` (none when ``tie_word_embeddings``) from ``llm_from`` (``model_type: qwen2``:
  Qwen2 / Qwen2.5 ``Qwen2ForCausalLM``).
* the image placeholder token (``image_token_index``): ``<|image_pad|>`` when the Qwen2 tokenizer has it
  (Qwen2.5 tokenizers do, at 151655 — not checked offline here — as does the shapes tokenizer of the tiny
  runs), the placeholder mllm_mega's data pipeline expands and checks against the model
  (``training/setup.py``), so the composed start passes those checks as it is; the tokenizer's
  ``<|video_pad|>`` / ``<|vision_start|>`` / ``<|vision_end|>`` ids are written as ``video_token_id`` /
  ``vision_start_token_id`` / ``vision_end_token_id`` too. Otherwise ``<image>`` (LLaVA's), added as a special
  token (id = tokenizer length) unless the tokenizer has it. When that id is outside the embedding table
  (``vocab_size``; Qwen2.5's tables have spare rows: 151936 for 151665 tokens) the table grows to id + 1 rows
  and each new row of ``embed_tokens`` (and of an untied ``lm_head``) is the mean of the old rows —
  deterministic, unlike transformers' sampled ``mean_resizing``.
* the tokenizer: the Qwen2 directory's files as they are (re-saved with ``<image>`` when it is added), a
  ``SiglipImageProcessor`` ``preprocessor_config.json`` (the vision dir's own when it has one, else SigLIP's
  defaults at the tower's ``image_size``: resize to a square, bicubic, rescale 1/255, mean = std = 0.5), a
  ``LlavaProcessor`` ``processor_config.json`` (the image token expands to (image_size / patch_size)^2 tokens)
  and the Qwen2 ``generation_config.json``.
* weights via ``save_pretrained`` (sharded at ``max_shard_size``) in the Qwen2 weights' dtype unless ``dtype``.

The output is written under ``.compose-*`` next to ``out`` and renamed when complete. Bad input (missing
directory, wrong model type, missing / corrupt / wrong-shape tensors, no tokenizer, non-empty ``out``) raises
FileNotFoundError / FileExistsError / ValueError naming the path or tensor and leaves nothing at ``out``.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile

import torch
from tqdm import tqdm

from mllm_mega.checkpoint.hf_io import parse_size, read_donor_config

IMAGE_TOKEN = "<image>"  # LLaVA's placeholder, added when the tokenizer has no Qwen2-VL one
QWEN_VISION_TOKENS = {"image_token_index": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                      "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
VISION_TYPES = ("siglip_vision_model", "siglip")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(cls, path: str, flag: str, allow_unexpected=lambda key: False):
    """``cls.from_pretrained(path)`` in the stored dtype; every missing / mismatched / unexpected tensor is an
    error (transformers would only warn and initialise it randomly)."""
    try:
        model, info = cls.from_pretrained(path, dtype="auto", output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, EnvironmentError) as e:
        raise ValueError(f"{flag} {path!r}: cannot load the weights ({type(e).__name__}: {e})") from None
    except Exception as e:  # safetensors' own error type on a bad header / truncated file
        raise ValueError(f"{flag} {path!r}: unreadable weights ({type(e).__name__}: {e})") from None
    if info.get("missing_keys"):
        raise ValueError(f"{flag} {path!r}: missing tensor(s) {sorted(info['missing_keys'])[:5]}")
    if info.get("mismatched_keys"):
        bad = [m[0] if isinstance(m, (tuple, list)) else m for m in info["mismatched_keys"]]
        raise ValueError(f"{flag} {path!r}: tensor(s) of the wrong shape {sorted(bad)[:5]}")
    extra = sorted(k for k in info.get("unexpected_keys", ()) if not allow_unexpected(k))
    if extra:
        raise ValueError(f"{flag} {path!r}: unexpected tensor(s) {extra[:5]} for a {cls.__name__} of this "
                         "config.json")
    return model.eval()


def _projector_init(shapes: list[tuple], seed: int) -> list[torch.Tensor]:
    """torch.nn.Linear's default init (kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
    weight, the same bound for the bias), drawn from one seeded generator in the order given."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, fan_in in shapes:
        bound = 1.0 / math.sqrt(fan_in)
        out.append((torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound)
    return out


def _vision_tokens(tokenizer) -> tuple[str, dict, bool]:
    """(image token, {config key: id}, added): Qwen2-VL's placeholder tokens when the tokenizer has
    ``<|image_pad|>``, else ``<image>`` (added when missing)."""
    vocab = tokenizer.get_vocab()
    if QWEN_VISION_TOKENS["image_token_index"] in vocab:
        return (QWEN_VISION_TOKENS["image_token_index"],
                {key: int(vocab[tok]) for key, tok in QWEN_VISION_TOKENS.items() if tok in vocab}, False)
    added = IMAGE_TOKEN not in vocab
    if added:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return IMAGE_TOKEN, {"image_token_index": int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))}, added


def _grow_vocab(llm, new_size: int) -> None:
    """Grow the embedding (and untied head) to ``new_size`` rows; new rows = the mean of the old ones."""
    emb = llm.get_input_embeddings().weight.detach().clone()
    head = llm.get_output_embeddings().weight.detach().clone()
    tied = bool(llm.config.get_text_config().tie_word_embeddings)
    llm.resize_token_embeddings(new_size, mean_resizing=False)
    with torch.no_grad():
        new_emb = llm.get_input_embeddings().weight
        new_emb[: emb.shape[0]] = emb
        new_emb[emb.shape[0]:] = emb.float().mean(0).to(emb.dtype)
        if not tied:
            new_head = llm.get_output_embeddings().weight
            new_head[: head.shape[0]] = head
            new_head[head.shape[0]:] = head.float().mean(0).to(head.dtype)


def compose_model(vision_from: str, llm_from: str, out: str, *, seed: int = 0, dtype: str | None = None,
                  max_shard_size: str = "5GB", progress: bool = True) -> dict:
    """Write the Open-Qwen2VL (LLaVA) HF directory ``out``; returns a summary dict (see the module docstring)."""
    from transformers import (AutoImageProcessor, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, Qwen2ForCausalLM, SiglipImageProcessorPil, SiglipVisionConfig,
                              SiglipVisionModel)

    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out!r} exists and is not an empty directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    shard_bytes = parse_size(max_shard_size)
    vis_cfg = read_donor_config(vision_from, "--vision-from", VISION_TYPES,
                           "a SigLIP directory: SiglipVisionModel or SiglipModel")
    read_donor_config(llm_from, "--llm-from", ("qwen2",), "a Qwen2 / Qwen2.5 directory (Qwen2ForCausalLM)")
    if vis_cfg["model_type"] == "siglip" and not isinstance(vis_cfg.get("vision_config"), dict):
        raise ValueError(f"--vision-from {vision_from!r}: a SiglipModel config.json without a 'vision_config'")
    if not os.path.isfile(os.path.join(llm_from, "tokenizer.json")) and \
            not os.path.isfile(os.path.join(llm_from, "tokenizer_config.json")):
        raise FileNotFoundError(f"--llm-from {llm_from!r} has no tokenizer (tokenizer.json / tokenizer_config.json)")

    bar = tqdm(total=5, desc="compose", unit="step", disable=not progress)
    full = vis_cfg["model_type"] == "siglip"
    vision = _load(SiglipVisionModel, vision_from, "--vision-from",
                   allow_unexpected=(lambda k: k.startswith(("text_model.", "logit_"))) if full else (lambda k: False))
    bar.update()
    llm = _load(Qwen2ForCausalLM, llm_from, "--llm-from")
    bar.update()
    vc = vision.config.to_dict()
    num_layers = int(vc["num_hidden_layers"])
    if num_layers < 2:
        raise ValueError(f"--vision-from {vision_from!r}: num_hidden_layers {num_layers}; the features come from "
                         "the second-to-last block, so at least 2 are needed")
    out_dtype = DTYPES[dtype] if dtype else llm.get_input_embeddings().weight.dtype

    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_from)
    except Exception as e:
        raise ValueError(f"--llm-from {llm_from!r}: unreadable tokenizer ({type(e).__name__}: {e})") from None
    image_token, token_ids, added = _vision_tokens(tokenizer)
    old_vocab = int(llm.config.vocab_size)
    if max(token_ids.values()) >= old_vocab:
        _grow_vocab(llm, max(token_ids.values()) + 1)

    vc.update(num_hidden_layers=num_layers - 1, vision_use_head=False)
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        vc.pop(key, None)
    text = llm.config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    grid = int(vc["image_size"]) // int(vc["patch_size"])
    config = LlavaConfig(vision_config=SiglipVisionConfig(**vc).to_dict(), text_config=text,
                         **token_ids, vision_feature_layer=-1, vision_feature_select_strategy="full",
                         projector_hidden_act="gelu", multimodal_projector_bias=True, image_seq_length=grid * grid,
                         tie_word_embeddings=bool(text.get("tie_word_embeddings")))
    model = LlavaForConditionalGeneration(config).eval()
    drop = (f"encoder.layers.{num_layers - 1}.", "head.")  # in-memory names, with or without "vision_model."
    vis_state = {k: v for k, v in vision.state_dict().items()
                 if not k.removeprefix("vision_model.").startswith(drop)}
    d_vis, d_llm = int(vc["hidden_size"]), int(text["hidden_size"])
    proj = dict(zip(("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"), _projector_init(
        [((d_llm, d_vis), d_vis), ((d_llm,), d_vis), ((d_llm, d_llm), d_llm), ((d_llm,), d_llm)], seed)))
    with torch.no_grad():
        model.model.vision_tower.load_state_dict(vis_state, strict=True)
        model.model.multi_modal_projector.load_state_dict(proj, strict=True)
        model.model.language_model.load_state_dict(llm.model.state_dict(), strict=True)
        if not config.tie_word_embeddings:
            model.lm_head.load_state_dict(llm.lm_head.state_dict(), strict=True)
    model = model.to(out_dtype)
    del vision, llm
    bar.update()

    proc_src = os.path.join(vision_from, "preprocessor_config.json")
    # SiglipImageProcessorPil: the PIL backend (no torchvision needed); it saves as "SiglipImageProcessor"
    image_processor = AutoImageProcessor.from_pretrained(vision_from) if os.path.isfile(proc_src) else \
        SiglipImageProcessorPil(size={"height": int(vc["image_size"]), "width": int(vc["image_size"])})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=int(vc["patch_size"]),
                               vision_feature_select_strategy="full", image_token=image_token,
                               num_additional_image_tokens=0)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".compose-", dir=parent)
    try:
        model.save_pretrained(tmp, max_shard_size=shard_bytes)
        bar.update()
        processor.save_pretrained(tmp)
        if not added:  # the source's own files: a re-save through transformers may add keys (e.g. an unk_token)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(llm_from, name)):
                    shutil.copyfile(os.path.join(llm_from, name), os.path.join(tmp, name))
        if os.path.isfile(os.path.join(llm_from, "generation_config.json")):
            shutil.copyfile(os.path.join(llm_from, "generation_config.json"),
                            os.path.join(tmp, "generation_config.json"))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.update()
    bar.close()
    return {
        "merger": f"projector linear_1 {d_vis}->{d_llm}, linear_2 {d_llm}->{d_llm}: nn.Linear default init, "
                  f"seed {seed}",
        "num_tensors": len(model.state_dict()), "dtype": str(out_dtype).replace("torch.", ""),
        "position_mode": "1d", "vision_layers": f"{num_layers} -> {num_layers - 1} (second-to-last block features)",
        "image_token": image_token, "token_ids": token_ids, "image_token_added": added,
        "vocab_size": f"{old_vocab} -> {config.text_config.vocab_size}",
    }


def compose_from_options(vision_from: str, llm_from: str, out: str, *, position_mode: str | None = None,
                         seed: int = 0, dtype: str | None = None, max_shard_size: str = "5GB",
                         progress: bool = True) -> dict:
    """The family's ``FamilySpec.compose_hf``: :func:`compose_model`; Open-Qwen2VL's LLM has 1-D positions
    only, so ``position_mode`` may be None or '1d'."""
    if position_mode not in (None, "1d"):
        raise ValueError(f"--position-mode {position_mode!r}: Open-Qwen2VL's LLM uses 1-D positions (only '1d')")
    return compose_model(vision_from, llm_from, out, seed=seed, dtype=dtype, max_shard_size=max_shard_size,
                         progress=progress)
