"""The megatron side of the Valley2.5 family: its HF ``config.json`` (``model_type: "valley"``, see
``hf/configuration_valley.py``) parsed into the Qwen2-VL-style :class:`ModelArch` that the shared towers are
built from (``mllm_mega.models.qwen2_vl``: NaViT ViT with LayerNorm + QuickGELU MLP, no windows, 2x2 merger)
with the Qwen3 LLM part (``mllm_mega.models.llms.qwen``: q/k RMSNorm per head, no QKV bias, explicit head_dim),
and what differs from Qwen2-VL: where ``mrope_section`` lives (top level, over Qwen3's head_dim) and
``position_mode`` (``"mrope"``: Qwen2-VL's 3-row positions, interval 1 for video frames; ``"1d"``: plain 1-D
positions 0..n-1 per sample, vision placeholders included, as the HF model's ``attention_mask.cumsum - 1``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from mllm_mega.models.llms.qwen import text_arch_from_hf
from mllm_mega.models.positions import sequential_position_ids
from mllm_mega.models.qwen2_vl.configuration import ModelArch, qwen2_vl_vision_arch

POSITION_MODES = ("mrope", "1d")
ARCHITECTURE = "ValleyForConditionalGeneration"


@dataclass
class ValleyArch(ModelArch):
    """A Valley model: the Qwen2-VL-style arch plus the LLM's position rule."""

    position_mode: str = "mrope"

    def __post_init__(self):
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"config.json: position_mode {self.position_mode!r} is not one of {POSITION_MODES}")
        super().__post_init__()


def default_mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's [16, 24, 24] (head_dim 128) scaled to another head_dim (as ``ValleyConfig``)."""
    half = head_dim // 2
    hw = half * 3 // 8
    return [half - 2 * hw, hw, hw]


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"config.json: missing required key {where}{key!r}")
    return cfg[key]


def arch_from_hf_config(cfg: dict) -> ValleyArch:
    """Parse a Valley ``config.json`` dict (``text_config``: Qwen3, ``vision_config``: Qwen2-VL vision)."""
    text_cfg = copy.deepcopy(_need(cfg, "text_config", ""))
    vis = _need(cfg, "vision_config", "")
    mode = cfg.get("position_mode", "mrope")
    if mode not in POSITION_MODES:
        raise ValueError(f"config.json: position_mode {mode!r} is not one of {POSITION_MODES}")
    num_heads = _need(text_cfg, "num_attention_heads", "text_config.")
    head_dim = text_cfg.get("head_dim") or _need(text_cfg, "hidden_size", "text_config.") // num_heads
    section = cfg.get("mrope_section") or default_mrope_section(head_dim)
    if mode == "1d":
        section = [head_dim // 2, 0, 0]  # three equal position rows: every frequency reads row 0
    if len(section) != 3:
        raise ValueError(f"config.json: mrope_section {section} must have 3 entries (temporal, height, width)")
    rope = dict(text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {})
    rope["mrope_section"] = [int(s) for s in section]
    text_cfg["rope_parameters"] = rope
    tie = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    text = text_arch_from_hf(text_cfg, kind="qwen3", tie=tie)
    vision = qwen2_vl_vision_arch(vis, text.hidden_size)
    return ValleyArch(
        family="valley", vision=vision, text=text,
        image_token_id=_need(cfg, "image_token_id", ""), video_token_id=_need(cfg, "video_token_id", ""),
        vision_start_token_id=_need(cfg, "vision_start_token_id", ""),
        vision_end_token_id=cfg.get("vision_end_token_id"), hf_config=cfg, position_mode=mode,
    )


def pack_hf_batch(arch: ValleyArch, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, pad_to_multiple: int = 1):
    """Qwen2-VL's packing; in ``1d`` mode the positions are 0..n-1 over each sample's real tokens."""
    from mllm_mega.models.vlm import pack_hf_batch as qwen2_vl_pack

    ids, pos, cu, index = qwen2_vl_pack(arch, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                        None, pad_to_multiple)  # Qwen2-VL: no absolute-time video ids
    if arch.position_mode == "1d":
        lens = (cu[1:] - cu[:-1]).tolist()
        pos = torch.cat([sequential_position_ids(range(n)) for n in lens], dim=1) if lens else pos
    return ids, pos, cu, index


def position_options(arch: ValleyArch) -> dict:
    """The position-id function of the data pipeline (None = MRoPE, ``sample_position_ids``)."""
    return {"position_ids_fn": sequential_position_ids} if arch.position_mode == "1d" else {}


def loader_options(arch: ValleyArch) -> dict:
    return {"spatial_merge_size": arch.vision.spatial_merge_size, "tokens_per_second": None,
            **position_options(arch)}


def eval_options(arch: ValleyArch) -> dict:
    return {"spatial_merge_size": arch.vision.spatial_merge_size, **position_options(arch)}


def verify_inputs(arch: ValleyArch) -> dict:
    """The Qwen2-VL verify cases (text, image, several images, video, batch of two) without
    ``second_per_grid_ts`` (Qwen2-VL-style video positions do not use it)."""
    from mllm_mega.models.qwen2_vl.inputs import CASES, random_inputs

    out = {}
    for case in CASES:
        inp = random_inputs(arch, case)
        inp.pop("second_per_grid_ts", None)
        out[case] = inp
    return out


def tiny_config(*, position_mode: str = "mrope", tie_word_embeddings: bool = False, **text_overrides) -> dict:
    """A tiny Valley config.json dict (``tiny.tiny_valley_config``); ``text_overrides`` replace text_config
    keys (e.g. ``num_hidden_layers``; a new ``hidden_size`` is also the merger's output width)."""
    from mllm_mega.models.families.valley.compose import AUTO_MAP
    from mllm_mega.models.families.valley.tiny import tiny_valley_config

    cfg = tiny_valley_config(position_mode=position_mode, tie_word_embeddings=tie_word_embeddings).to_dict()
    cfg["text_config"].update(text_overrides)
    if "hidden_size" in text_overrides:
        cfg["vision_config"]["hidden_size"] = text_overrides["hidden_size"]
    cfg["architectures"] = [ARCHITECTURE]
    cfg["auto_map"] = dict(AUTO_MAP)
    cfg.pop("_attn_implementation_autoset", None)
    return cfg


def build_tiny_hf_model(seed: int = 0, *, vision_overrides: dict | None = None, **kwargs):
    """A random ``ValleyForConditionalGeneration`` of :func:`tiny_config` (norms and biases randomised) whose
    ``save_pretrained`` writes the remote code and ``auto_map`` (so the directory loads with
    trust_remote_code, like a composed one)."""
    from mllm_mega.models.families.valley.hf.configuration_valley import ValleyConfig
    from mllm_mega.models.families.valley.hf.modeling_valley import ValleyForConditionalGeneration
    from mllm_mega.models.families.valley.tiny import _randomise_norms

    cfg = tiny_config(**kwargs)
    cfg["vision_config"].update(vision_overrides or {})
    config = ValleyConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "model_type")})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = _randomise_norms(ValleyForConditionalGeneration(config).eval(), seed)
    config.register_for_auto_class()
    model.register_for_auto_class("AutoModelForImageTextToText")
    return model


def hf_code_files(arch=None) -> list[str]:
    """The remote-code files an HF export writes next to config.json (named by its ``auto_map``)."""
    import os

    from mllm_mega.models.families.valley.compose import CODE_FILES, HF_CODE_DIR

    return [os.path.join(HF_CODE_DIR, name) for name in CODE_FILES]


def export_hf_config(hf_config: dict, dtype: torch.dtype) -> dict:
    """The config.json of an export: the imported one with its dtype, ``architectures`` and ``auto_map`` set
    (so it loads with ``trust_remote_code=True``)."""
    from mllm_mega.models.families.valley.compose import AUTO_MAP

    cfg = copy.deepcopy(hf_config)
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    for sub in ("text_config", "vision_config"):
        if isinstance(cfg.get(sub), dict):
            for key in ("dtype", "torch_dtype"):
                if key in cfg[sub]:
                    cfg[sub][key] = name
    cfg.pop("torch_dtype", None)
    cfg["architectures"] = [ARCHITECTURE]
    cfg["auto_map"] = dict(AUTO_MAP)
    return cfg


