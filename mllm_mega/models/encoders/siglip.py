"""SigLIP vision encoder (transformers' ``SiglipVisionModel``, the SigLIP paper's ViT) on megatron-core layers,
with native tensor parallelism, as Open-Qwen2VL (SigLIP-SO400M-patch14-384) and the LLaVA-interleave-Qwen
models use it: fixed-resolution images, a patch embedding (a Conv2d with stride = kernel, i.e. a Linear over
the flattened patch), learned absolute position embeddings, pre-LayerNorm blocks with a GELU(tanh) MLP and
bidirectional attention within each image; the features are the hidden state after a chosen block (LLaVA's
``vision_feature_layer``: ``hidden_states[L]``, *before* ``post_layernorm``, which only the pooling head and
``last_hidden_state`` use). ``post_layernorm`` (as buffers) and any block after the chosen one are held (a
checkpoint round trip keeps them) but never run; the LLaVA-interleave / Open-Qwen2VL towers are truncated so that
no block is unused (a trainable unused block would get no gradient).

Pixel format inside mllm_mega (:func:`siglip_patches`): a fixed-resolution image is given as flattened patches
``(num_images * (H/p) * (W/p), 3*p*p)`` in row-major patch order, each patch ordered (channel, row, col), with
``image_grid_thw`` rows ``(1, H/p, W/p)``; the HF processor's ``(N, 3, H, W)`` tensor is also accepted.

Tensor parallelism: attention heads and MLP are split over the TP group; the patch and position embeddings
and the norms are replicated; activations are replicated (no sequence parallelism in the encoder).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from mllm_mega.models.common.attention import make_packed_seq_params
from mllm_mega.models.common.layer_spec import layer_spec


@dataclass
class SiglipVisionArch:
    """SigLIP vision tower + average-pool projector shapes."""

    num_layers: int  # blocks the checkpoint holds (``num_hidden_layers``)
    num_layers_used: int  # blocks run: the features are the hidden state after this many (0: the embeddings)
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    out_hidden_size: int  # projector output width = LLM hidden size
    image_size: int = 384
    patch_size: int = 14
    in_channels: int = 3
    norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    pool_grid: int | None = None  # projector output grid k (k x k tokens per image); None: the patch grid
    projector_bias: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"vision_config.image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision_config.hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_heads}")
        if not 0 <= self.num_layers_used <= self.num_layers:
            raise ValueError(f"vision feature layer: {self.num_layers_used} blocks of {self.num_layers}")
        if self.pool_grid is None:
            self.pool_grid = self.grid
        if not 1 <= self.pool_grid <= self.grid:
            raise ValueError(f"projector pool grid {self.pool_grid} must be between 1 and the patch grid {self.grid}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size

    @property
    def grid(self) -> int:
        """Patches per image side (27 for 384 px / 14 px patches)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.pool_grid * self.pool_grid

    def tokens_per_grid(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Placeholder tokens of each ``grid_thw`` row: the pool's k*k whatever the patch grid."""
        return torch.full((grid_thw.shape[0],), self.tokens_per_image, dtype=torch.long)


def siglip_patches(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) images -> (N * H/p * W/p, C*p*p) flattened patches, row-major over the patch grid, each
    patch ordered (channel, row, col): what a Conv2d(kernel=p, stride=p) weight flattened to (out, C*p*p) sees."""
    n, c, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: H and W must be multiples of the patch size "
                         f"{patch_size}")
    p = patch_size
    x = pixel_values.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, h, w, C, p, p)
    return x.reshape(n * (h // p) * (w // p), c * p * p)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class HeldLayerNorm(nn.Module):
    """``post_layernorm``'s weight and bias as buffers: saved, imported and exported with the checkpoint but
    never run nor trained (LLaVA's features precede it; a parameter without a gradient would stall megatron's
    overlapped gradient reduction)."""

    def __init__(self, hidden_size: int, dtype):
        super().__init__()
        self.register_buffer("weight", torch.ones(hidden_size, dtype=dtype))
        self.register_buffer("bias", torch.zeros(hidden_size, dtype=dtype))


class SiglipEncoder(MegatronModule):
    """Patch + position embeddings, megatron transformer layers (per-image bidirectional packed attention),
    then the projector (held as the ``merger`` child; called as ``merger(features, grid_thw)``)."""

    def __init__(self, config, arch: SiglipVisionArch, make_projector, kernels: str = "torch"):
        super().__init__(config=config)
        self.arch = arch
        dtype = config.params_dtype
        self.patch_embed = nn.Linear(arch.patch_dim, arch.hidden_size, bias=True, dtype=dtype)
        self.position_embedding = nn.Embedding(arch.grid * arch.grid, arch.hidden_size, dtype=dtype)
        spec = layer_spec(causal=False, norm="layernorm", kernels=kernels)
        self.layers = nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(arch.num_layers)]
        )
        self.post_layernorm = HeldLayerNorm(arch.hidden_size, dtype)
        self.merger = make_projector()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (num_patches, C*p*p) or (N, C, H, W), grid_thw (N, 3) -> (N * k*k, out_hidden)."""
        a = self.arch
        if pixel_values.dim() == 4:
            pixel_values = siglip_patches(pixel_values, a.patch_size)
        grid_thw = grid_thw.cpu()
        bad = [tuple(g) for g in grid_thw.tolist() if tuple(g) != (1, a.grid, a.grid)]
        if bad:
            raise ValueError(f"image_grid_thw rows {bad[:3]}: this SigLIP tower takes fixed {a.image_size}x"
                             f"{a.image_size} images, grid (1, {a.grid}, {a.grid})")
        num_images, per_image = grid_thw.shape[0], a.grid * a.grid
        if pixel_values.shape != (num_images * per_image, a.patch_dim):
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)}: expected ({num_images * per_image}, "
                             f"{a.patch_dim}) for {num_images} image(s) of {per_image} patches")
        device = pixel_values.device
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        hidden = (hidden.view(num_images, per_image, -1) + self.position_embedding.weight).view(-1, a.hidden_size)
        cu = (torch.arange(num_images + 1, dtype=torch.int32) * per_image).to(device)
        params = make_packed_seq_params(cu, per_image, None, None, ())  # no RoPE: absolute positions above
        hidden = self._run_layers(hidden.unsqueeze(1), params)  # (T, 1, hidden): megatron's [s, b, h]
        return self.merger(hidden.squeeze(1), grid_thw)

    def _run_layers(self, hidden, params):
        """The first ``num_layers_used`` layers, with megatron's full recompute done as TransformerBlock does:
        ``uniform`` checkpoints chunks of ``recompute_num_layers`` layers, ``block`` only the first ones."""
        from megatron.core import tensor_parallel

        depth, cfg = self.arch.num_layers_used, self.config

        def run(start, end):
            def forward(h):
                for i in range(start, end):
                    h, _ = self.layers[i](h, attention_mask=None, packed_seq_params=params)
                return h

            return forward

        if not (cfg.recompute_granularity == "full" and self.training and torch.is_grad_enabled()):
            return run(0, depth)(hidden)
        n = cfg.recompute_num_layers
        if cfg.recompute_method == "uniform":
            chunks = [(s, min(s + n, depth), True) for s in range(0, depth, n)]
        else:  # block
            chunks = [(i, i + 1, i < n) for i in range(depth)]
        for start, end, recompute in chunks:
            fn = run(start, end)
            hidden = tensor_parallel.checkpoint(fn, cfg.distribute_saved_activations, hidden) if recompute \
                else fn(hidden)
        return hidden

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # the tower lives whole on the first pipeline stage: layers numbered locally, replicated parts marked
        from mllm_mega.models.encoders.qwen2_vit import VisionTransformer

        return VisionTransformer.sharded_state_dict(self, prefix, sharded_offsets, metadata)


def vision_transformer_config(arch: SiglipVisionArch, common: dict, recompute=None):
    """megatron-core ``TransformerConfig`` of the SigLIP tower (``common``: precision flags shared by towers)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mllm_mega.models.layout import _recompute_kwargs

    tp = common["tensor_model_parallel_size"]
    if arch.num_heads % tp or arch.ffn_hidden_size % tp:
        raise ValueError(f"vision num_attention_heads {arch.num_heads} / intermediate_size {arch.ffn_hidden_size} "
                         f"not divisible by TP={tp}")
    return TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, kv_channels=arch.head_dim, add_bias_linear=True, add_qkv_bias=True,
        gated_linear_unit=False, activation_func=gelu_tanh, normalization="LayerNorm",
        layernorm_epsilon=arch.norm_eps,
        sequence_parallel=False,  # the encoder runs on replicated patches; only its weights are split
        **{**common, "pipeline_model_parallel_size": 1},
        **_recompute_kwargs(recompute, max(arch.num_layers_used, 1), "vision"),
    )


def build_encoder(arch, vision_config, make_projector, *, kernels: str = "torch") -> SiglipEncoder:
    """The encoder part of :mod:`mllm_mega.models.vlm` (``arch``: the whole model arch)."""
    return SiglipEncoder(vision_config, arch.vision, make_projector, kernels=kernels)
