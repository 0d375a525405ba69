"""The megatron side of the Open-Qwen2VL family (Victorwz/Open-Qwen2VL, ``prismatic-vlms``): SigLIP vision
(:mod:`mllm_mega.models.encoders.siglip`) -> average-pool projector (:mod:`mllm_mega.models.projectors.avg_pool`:
k x k tokens per image) -> Qwen2 LLM with 1-D positions (restarting per packed sample).

Its HF form is transformers' ``LlavaForConditionalGeneration`` with a SigLIP vision config and a Qwen2 text
config (as the ``llava-interleave-qwen`` checkpoints: ``vision_feature_select_strategy: full``, no pooling
head), which expresses the model exactly when the pool grid is the patch grid (729 tokens for 384 px / 14 px).
The pool grid is the extra config.json key ``projector_pool_grid`` (absent: the patch grid); a model that pools
to fewer tokens (Open-Qwen2VL's 144-token pretraining) is not expressible in LLaVA and ``export-hf`` refuses it.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from mllm_mega.models.encoders.siglip import SiglipVisionArch
from mllm_mega.models.llms.qwen import TextArch, text_arch_from_hf

ARCHITECTURE = "LlavaForConditionalGeneration"
POOL_GRID_KEY = "projector_pool_grid"
# SiglipVisionConfig's defaults, for keys a config.json leaves out
_SIGLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
                    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's defaults


@dataclass
class OpenQwen2VLArch:
    """A whole model: SigLIP + avg-pool projector (``vision``), the Qwen2 LLM (``text``), placeholder ids."""

    family: str
    vision: SiglipVisionArch
    text: TextArch
    image_token_id: int
    video_token_id: int = -1  # LLaVA has no video placeholder: -1 never matches a token
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    projector_pool_grid: int | None = None  # config.json ``projector_pool_grid``; None: the patch grid
    hf_config: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hf_config")
        return d


def _sub(cfg: dict, key: str) -> dict:
    sub = cfg.get(key)
    if not isinstance(sub, dict):
        raise ValueError(f"config.json: missing required object {key!r}")
    return sub


def arch_from_hf_config(cfg: dict) -> OpenQwen2VLArch:
    """Parse a LLaVA ``config.json`` dict whose vision tower is SigLIP and whose LLM is Qwen2; any other LLaVA
    variant (CLIP, Llama, a pooling head, ``default`` feature selection) is an error naming the field."""
    vis, text_cfg = _sub(cfg, "vision_config"), _sub(cfg, "text_config")
    for where, sub, want in (("vision_config", vis, "siglip_vision_model"), ("text_config", text_cfg, "qwen2")):
        if sub.get("model_type") != want:
            raise ValueError(f"config.json: {where}.model_type is {sub.get('model_type')!r}; the open_qwen2vl "
                             f"family reads LLaVA models with {where}.model_type {want!r} only")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        raise ValueError(f"config.json: vision_feature_select_strategy {strategy!r} is not supported (SigLIP has no "
                         "CLS token: 'full')")
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"config.json: vision_feature_layer {layer!r} must be one int (one feature layer)")
    for key, want in (("projector_hidden_act", "gelu"),):
        if cfg.get(key, want) != want:
            raise ValueError(f"config.json: {key} {cfg.get(key)!r} is not supported ({want!r})")
    v = {**_SIGLIP_DEFAULTS, **vis}
    if v["vision_use_head"]:
        raise ValueError("config.json: vision_config.vision_use_head is true: the SigLIP pooling head is not "
                         "supported (LLaVA never uses it)")
    if v["hidden_act"] != "gelu_pytorch_tanh":
        raise ValueError(f"config.json: vision_config.hidden_act {v['hidden_act']!r} is not supported "
                         "('gelu_pytorch_tanh')")
    num_layers = int(v["num_hidden_layers"])
    used = num_layers + 1 + layer if layer < 0 else layer  # hidden_states[L]: index 0 is the embeddings
    if not 0 <= used <= num_layers:
        raise ValueError(f"config.json: vision_feature_layer {layer} is outside the {num_layers + 1} hidden states "
                         f"of a {num_layers}-layer vision tower")
    tie = bool(cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", False)))
    text = text_arch_from_hf(text_cfg, kind="qwen2", tie=tie, mrope=False)
    pool = cfg.get(POOL_GRID_KEY)
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int)):
        raise ValueError(f"config.json: {POOL_GRID_KEY} {pool!r} must be an int (k: k x k tokens per image)")
    try:
        vision = SiglipVisionArch(
            num_layers=num_layers, num_layers_used=used, hidden_size=int(v["hidden_size"]),
            ffn_hidden_size=int(v["intermediate_size"]), num_heads=int(v["num_attention_heads"]),
            out_hidden_size=text.hidden_size, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
            in_channels=int(v["num_channels"]), norm_eps=float(v["layer_norm_eps"]), hidden_act=v["hidden_act"],
            pool_grid=pool, projector_bias=bool(cfg.get("multimodal_projector_bias", True)),
        )
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None
    image_token = cfg.get("image_token_id", cfg.get("image_token_index", 32000))
    return OpenQwen2VLArch(
        family="open_qwen2vl", vision=vision, text=text, image_token_id=int(image_token),
        video_token_id=cfg.get("video_token_id", -1), vision_start_token_id=cfg.get("vision_start_token_id"),
        vision_end_token_id=cfg.get("vision_end_token_id"), projector_pool_grid=pool, hf_config=cfg,
    )


def to_transformer_configs(arch: OpenQwen2VLArch, layout, *, params_dtype=torch.float32,
                           use_cpu_initialization: bool = True, recompute_vision=None, recompute_llm=None):
    """The only conversion to megatron-core ``TransformerConfig``: (vision_config, llm_config)."""
    from mllm_mega.models.encoders.siglip import vision_transformer_config
    from mllm_mega.models.llms.causal_lm import _common
    from mllm_mega.models.llms.qwen import llm_transformer_config

    common = _common(params_dtype, use_cpu_initialization, layout.tensor_model_parallel_size,
                     layout.pipeline_model_parallel_size)
    if arch.text.hidden_size % layout.tensor_model_parallel_size:
        raise ValueError(f"text_config.hidden_size {arch.text.hidden_size} (the projector width) not divisible by "
                         f"TP={layout.tensor_model_parallel_size}")
    return (vision_transformer_config(arch.vision, common, recompute_vision),
            llm_transformer_config(arch.text, layout, common, recompute_llm))


def check_layout(arch: OpenQwen2VLArch, layout):
    return to_transformer_configs(arch, layout)


def build_model(arch: OpenQwen2VLArch, layout=None, **kwargs):
    """This rank's stage: the generic VLM with the SigLIP encoder and the average-pool projector."""
    from mllm_mega.models.encoders.siglip import build_encoder
    from mllm_mega.models.projectors.avg_pool import build_projector
    from mllm_mega.models.vlm import build_stage

    return build_stage(arch, layout, to_configs=to_transformer_configs, make_encoder=build_encoder,
                       make_projector=build_projector, **kwargs)


def module_groups(model) -> dict:
    """{vision: SigLIP parameters, merger: projector parameters, llm: LLM parameters} of one stage."""
    groups = {"vision": [], "merger": [], "llm": list(model.language_model.parameters())}
    if model.vision is not None:
        merger = {id(p) for p in model.vision.merger.parameters()}
        for p in model.vision.parameters():
            groups["merger" if id(p) in merger else "vision"].append(p)
    return groups


# ---- data --------------------------------------------------------------------------------------------------
def loader_options(arch: OpenQwen2VLArch) -> dict:
    """build_train_loader kwargs: fixed-resolution SigLIP preprocessing, k*k placeholders per image, 1-D
    positions restarting per packed sample."""
    from mllm_mega.models.positions import sequential_position_ids

    v = arch.vision
    return {"image_processing": "fixed", "image_size": (v.image_size, v.image_size), "patch_size": v.patch_size,
            "tokens_per_image": v.tokens_per_image, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
            "resample": 3, "rescale_factor": 1 / 255, "position_ids_fn": sequential_position_ids}


def eval_options(arch: OpenQwen2VLArch) -> dict:
    return loader_options(arch)


def processor_config(arch: OpenQwen2VLArch, data_cfg=None) -> dict:
    """A SiglipImageProcessor preprocessor_config.json of the tower's resolution."""
    size = arch.vision.image_size
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD)}


def pack_hf_batch(arch, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grid_ts=None, pad_to_multiple: int = 1):
    """A padded HF batch -> one THD sequence with 1-D positions 0..n-1 per sample (LLaVA's Qwen2 positions on
    right-padded rows). HF's (N, 3, H, W) ``pixel_values`` are taken by the encoder as they are (it applies
    :func:`~mllm_mega.models.encoders.siglip.siglip_patches`)."""
    from mllm_mega.models.llms.causal_lm import pack_hf_batch as pack_1d

    return pack_1d(arch, input_ids, attention_mask, pad_to_multiple=pad_to_multiple)


def verify_inputs(arch: OpenQwen2VLArch) -> dict:
    """HF processor-style inputs: text only, one image, three images in one sequence, a right-padded batch of
    two (one and two images); ``image_grid_thw`` rows (1, g, g) ride along (transformers ignores them)."""
    g = torch.Generator().manual_seed(0)
    v, n = arch.vision, arch.vision.tokens_per_image
    special = {arch.image_token_id, arch.video_token_id, arch.vision_start_token_id, arch.vision_end_token_id}
    low = max([s for s in special if s is not None and s < 64] + [-1]) + 1

    def text(k):
        return torch.randint(low, min(arch.text.vocab_size, 400), (k,), generator=g).tolist()

    image = [arch.image_token_id] * n
    cases = {"text": [[text(19)], 0], "image": [[text(5) + image + text(7)], 1],
             "multi_image": [[text(3) + image + text(4) + image + image + text(2)], 3],
             "batch": [[text(4) + image + text(9), text(2) + image + text(3) + image + text(1)], 3]}
    out = {}
    for name, (rows, num_images) in cases.items():
        seq = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), seq, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        inp = {"input_ids": ids, "attention_mask": mask}
        if num_images:
            inp["pixel_values"] = torch.randn(num_images, v.in_channels, v.image_size, v.image_size, generator=g)
            inp["image_grid_thw"] = torch.tensor([[1, v.grid, v.grid]] * num_images)
        out[name] = inp
    return out


def forward_flops(arch: OpenQwen2VLArch, num_images: int, segment_lens: list[int], *, causal: bool = True
                  ) -> dict[str, float]:
    """{"vision", "merger", "llm"} forward FLOPs (matmuls; the pool and norms are not counted): SigLIP's blocks
    that run, the projector on k*k tokens per image, the LLM on packed samples of these lengths (``causal``: see
    :func:`mllm_mega.models.llms.qwen.llm_forward_flops`)."""
    from mllm_mega.models.llms.qwen import llm_forward_flops

    v, patches = arch.vision, arch.vision.grid ** 2
    h = v.hidden_size
    per_patch = 2 * h * 3 * h + 2 * h * h + 4 * h * v.ffn_hidden_size  # qkv, proj, fc1 + fc2
    vit = num_images * (2 * v.patch_dim * h * patches
                        + v.num_layers_used * (per_patch * patches + 4 * h * patches * patches))
    merger = num_images * v.tokens_per_image * (2 * h * v.out_hidden_size + 2 * v.out_hidden_size ** 2)
    llm = sum(llm_forward_flops(arch.text, segment_lens, causal=causal).values())
    return {"vision": float(vit), "merger": float(merger), "llm": float(llm)}


def pack_flops(arch: OpenQwen2VLArch, pack: dict, multipliers: dict[str, int]) -> float:
    """Training FLOPs of one pack's real tokens (:func:`forward_flops` times the training multipliers)."""
    lens, real, kept = (pack["cu_seqlens"][1:] - pack["cu_seqlens"][:-1]).tolist(), int(pack["num_real_tokens"]), []
    for n in lens:  # samples first, then the padding segment
        if sum(kept) >= real:
            break
        kept.append(n)
    grid = pack.get("image_grid_thw")
    f = forward_flops(arch, 0 if grid is None else int(grid.shape[0]), kept)
    return float(sum(multipliers[k] * f[k] for k in ("vision", "merger", "llm")))


# ---- export --------------------------------------------------------------------------------------------------
def export_hf_config(hf_config: dict, dtype: torch.dtype) -> dict:
    """The config.json of an export; refuses a model whose pool gives fewer tokens than the patch grid."""
    arch = arch_from_hf_config(hf_config)
    v = arch.vision
    if v.pool_grid < v.grid:
        raise ValueError(
            f"this open_qwen2vl model pools each image's {v.grid}x{v.grid} patch grid to {v.pool_grid}x"
            f"{v.pool_grid} = {v.tokens_per_image} tokens ({POOL_GRID_KEY}={v.pool_grid}), which "
            f"LlavaForConditionalGeneration cannot express (it has no pooling: its projector sees all "
            f"{v.grid * v.grid} patches), so transformers would load it as a different model. Export a checkpoint "
            f"trained with the pool grid equal to the patch grid (the same weights: set model.arch_overrides: "
            f"{{{POOL_GRID_KEY}: {v.grid}}}, e.g. the SFT stage), or keep using this mllm_mega checkpoint")
    cfg = copy.deepcopy(hf_config)
    name = str(dtype).replace("torch.", "")
    cfg["dtype"] = name
    cfg.pop("torch_dtype", None)
    for sub in ("text_config", "vision_config"):
        for key in ("dtype", "torch_dtype"):
            if key in cfg[sub]:
                cfg[sub][key] = name
    cfg["image_token_index"] = arch.image_token_id  # LlavaConfig's name (image_token_id is its alias)
    cfg.pop("image_token_id", None)
    cfg["architectures"] = [ARCHITECTURE]
    return cfg
