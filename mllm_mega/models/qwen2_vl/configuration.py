"""Architecture description of a Qwen2-VL / Qwen2.5-VL model, read from a HF ``config.json``.

One typed source of truth for the model's shapes; :func:`to_transformer_configs` is the only place that turns
it into megatron-core ``TransformerConfig`` objects (one for the vision tower, one for the LLM).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

import torch

from mllm_mega.models.layout import ParallelLayout, Recompute, _recompute_kwargs  # noqa: F401 (re-exported)
from mllm_mega.models.llms.qwen import TextArch, llm_transformer_config, text_arch_from_hf

FAMILIES = {
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
}
MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl"}


@dataclass
class VisionArch:
    """Vision tower (NaViT ViT + 2x2 patch merger) shapes."""

    depth: int
    hidden_size: int  # ViT width (``embed_dim`` in Qwen2-VL configs)
    ffn_hidden_size: int
    num_heads: int
    out_hidden_size: int  # merger output width = LLM hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    hidden_act: str = "silu"
    window_size: int | None = None  # pixels; None = no window attention (Qwen2-VL)
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float | None = None  # MRoPE temporal scale for videos (Qwen2.5-VL only)
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # rmsnorm (Qwen2.5-VL) | layernorm (Qwen2-VL)
    gated_mlp: bool = True  # SwiGLU (Qwen2.5-VL) | plain MLP (Qwen2-VL)
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass
class ModelArch:
    """A whole Qwen2(.5)-VL model: family, towers and special token ids."""

    family: str  # qwen2_5_vl | qwen2_vl
    vision: VisionArch
    text: TextArch
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, repr=False)  # the original config.json, for export

    def __post_init__(self):
        from mllm_mega.models import registry

        if self.family not in registry.names():
            raise ValueError(f"family {self.family!r} not supported; expected one of {registry.names()}")
        if sum(self.text.mrope_section) * 2 != self.text.head_dim:
            raise ValueError(
                f"rope_parameters.mrope_section {self.text.mrope_section} must sum to head_dim/2 = "
                f"{self.text.head_dim // 2}"
            )
        if self.text.num_heads % self.text.num_kv_heads:
            raise ValueError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        if self.vision.hidden_size % self.vision.num_heads or self.vision.head_dim % 4:
            raise ValueError("vision hidden_size / num_heads must be an integer divisible by 4 (2D RoPE)")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size {self.text.hidden_size}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        return d


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ValueError(f"config.json: missing required key {where}{key!r}")
    return cfg[key]


def qwen2_vl_vision_arch(vis: dict, out_hidden: int) -> VisionArch:
    """The Qwen2-VL NaViT ViT (LayerNorm, quick-GELU MLP, no windows) of a ``vision_config`` dict;
    ``out_hidden``: the merger's output width when the config does not give ``hidden_size``."""
    embed_dim = _need(vis, "embed_dim", "vision_config.")
    vrope = vis.get("rope_parameters") or {}
    vision = VisionArch(
        depth=_need(vis, "depth", "vision_config."),
        hidden_size=embed_dim,
        ffn_hidden_size=int(embed_dim * vis.get("mlp_ratio", 4)),
        num_heads=_need(vis, "num_heads", "vision_config."),
        out_hidden_size=vis.get("hidden_size", out_hidden),
        patch_size=vis.get("patch_size", 14),
        temporal_patch_size=vis.get("temporal_patch_size", 2),
        spatial_merge_size=vis.get("spatial_merge_size", 2),
        in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
        hidden_act=vis.get("hidden_act", "quick_gelu"),
        window_size=None,
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        norm="layernorm",
        gated_mlp=False,
    )
    if vision.hidden_act != "quick_gelu":
        raise ValueError(f"config.json: vision_config.hidden_act {vision.hidden_act!r} not supported (quick_gelu)")
    return vision


def arch_from_hf_config(cfg: dict) -> ModelArch:
    """Parse a HF Qwen2-VL / Qwen2.5-VL ``config.json`` dict (nested ``text_config`` or flat, 4.x style)."""
    archs = cfg.get("architectures") or []
    family = None
    for a in archs:
        family = FAMILIES.get(a, family)
    family = family or MODEL_TYPES.get(cfg.get("model_type", ""))
    if family is None:
        raise ValueError(
            f"config.json: unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
            f"{sorted(FAMILIES)}"
        )
    text_cfg = cfg.get("text_config") or cfg  # transformers 4.x wrote the text keys at the top level
    vis = _need(cfg, "vision_config", "")
    tie = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    text = text_arch_from_hf(text_cfg, kind="qwen2", tie=tie)
    hidden = text.hidden_size
    vrope = vis.get("rope_parameters") or {}
    if family == "qwen2_5_vl":
        vision = VisionArch(
            depth=_need(vis, "depth", "vision_config."),
            hidden_size=_need(vis, "hidden_size", "vision_config."),
            ffn_hidden_size=_need(vis, "intermediate_size", "vision_config."),
            num_heads=_need(vis, "num_heads", "vision_config."),
            out_hidden_size=vis.get("out_hidden_size", hidden),
            patch_size=vis.get("patch_size", 14),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            hidden_act=vis.get("hidden_act", "silu"),
            window_size=vis.get("window_size", 112),
            fullatt_block_indexes=list(vis.get("fullatt_block_indexes", [])),
            tokens_per_second=vis.get("tokens_per_second", 4),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
            norm="rmsnorm",
            gated_mlp=True,
        )
        if vision.hidden_act != "silu":
            raise ValueError(f"config.json: vision_config.hidden_act {vision.hidden_act!r} not supported (silu)")
    else:
        vision = qwen2_vl_vision_arch(vis, hidden)
    return ModelArch(
        family=family,
        vision=vision,
        text=text,
        image_token_id=_need(cfg, "image_token_id", ""),
        video_token_id=_need(cfg, "video_token_id", ""),
        vision_start_token_id=_need(cfg, "vision_start_token_id", ""),
        vision_end_token_id=cfg.get("vision_end_token_id"),
        hf_config=cfg,
    )


def load_arch(hf_dir: str) -> ModelArch:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json (is {hf_dir!r} a HF model directory?)")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return arch_from_hf_config(cfg)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def to_transformer_configs(arch: ModelArch, layout: ParallelLayout, *, params_dtype=torch.float32,
                           use_cpu_initialization: bool = True, recompute_vision: Recompute | None = None,
                           recompute_llm: Recompute | None = None):
    """The only conversion to megatron-core ``TransformerConfig``: returns (vision_config, llm_config)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    common = dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=0.02,
    )
    v = arch.vision
    if v.num_heads % tp or v.ffn_hidden_size % tp:
        raise ValueError(f"vision num_heads {v.num_heads} / ffn {v.ffn_hidden_size} not divisible by TP={tp}")
    vision_cfg = TransformerConfig(
        num_layers=v.depth,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_heads,
        kv_channels=v.head_dim,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=v.gated_mlp,
        activation_func=F.silu if v.gated_mlp else quick_gelu,
        normalization="RMSNorm" if v.norm == "rmsnorm" else "LayerNorm",
        layernorm_epsilon=v.norm_eps,
        sequence_parallel=False,  # the ViT runs on replicated patches; only its weights are split
        **{**common, "pipeline_model_parallel_size": 1},
        **_recompute_kwargs(recompute_vision, v.depth, "vision"),
    )
    llm_cfg = llm_transformer_config(arch.text, layout, common, recompute_llm)
    return vision_cfg, llm_cfg
