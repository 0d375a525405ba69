"""NaViT vision encoder of Qwen2-VL / Qwen2.5-VL on megatron-core layers, with native tensor parallelism.

As in the Qwen2.5-VL report: patches of 14 px over 2 frames (a still image is two identical frames), 2D RoPE
over the (h, w) patch coordinates, window attention over 112 px windows (8x8 patches = 4x4 merged units) in
all layers but ``fullatt_block_indexes`` (which attend over whole frames); the projector (a part, e.g.
:mod:`mllm_mega.models.projectors.patch_merger`) maps each merged unit into the LLM width. Qwen2-VL has no windows (every layer attends over whole frames), LayerNorm and a
QuickGELU MLP. All attention is non-causal and packed (THD): many images of any size form one sequence.

Tensor parallelism: attention heads and MLP are split over the TP group; the patch embedding and
norms are replicated; activations are replicated (no sequence parallelism in the ViT).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from torch import nn

from mllm_mega.models.common.attention import make_packed_seq_params
from mllm_mega.models.common.layer_spec import layer_spec


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(2, num_patches) (h, w) coordinates of every patch, in the processor's patch order.

    The processor lays patches out so that each merge x merge group is contiguous (block-major order).
    """
    rows = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([hh.transpose(1, 2).reshape(-1), ww.transpose(1, 2).reshape(-1)])
        rows.append(hw.repeat(1, t))
    return torch.cat(rows, dim=1) if rows else torch.zeros(2, 0, dtype=torch.long)


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Segments for full attention: one per frame (h*w patches, repeated t times per image)."""
    lens = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def window_partition(grid_thw: torch.Tensor, merge: int, window_units: int):
    """Window attention layout (Qwen2.5-VL).

    Returns ``window_index`` (num_merged_units,) — the permutation of merged units into window order (windows of
    window_units x window_units merged units, row-major over each frame, partial windows at the right/bottom
    edges keep only their real units) — and ``cu_window_seqlens`` (num_windows + 1,) int32 in patches.
    """
    index, lens, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        for f in range(t):
            for r in range(0, gh, window_units):
                for c in range(0, gw, window_units):
                    win = ids[f, r:r + window_units, c:c + window_units].reshape(-1)
                    index.append(win)
                    lens.append(win.numel() * merge * merge)
        offset += t * gh * gw
    window_index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    cu = F.pad(torch.tensor(lens, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32)
    return window_index, cu


class VisionTransformer(MegatronModule):
    """Patch embedding, megatron transformer layers with packed (window / frame) attention, then the projector.

    ``arch``: the vision arch (``VisionArch``); ``make_projector()`` builds the projector, a module mapping
    (num_patches, hidden) in the processor's patch order to (num_merged_units, out_hidden). It is held as the
    ``merger`` child so that checkpoints keep the keys ``vision.merger.*``, and built after the layers so that
    a seeded initialisation draws as before; with windows its output is put back in processor order here, per
    merged unit."""

    def __init__(self, config, arch, make_projector, kernels: str = "torch"):
        super().__init__(config=config)
        self.arch = arch
        self.merge = arch.spatial_merge_size
        # A Conv3d with stride == kernel over (C, T, P, P) patches is a matmul over the flattened patch.
        self.patch_embed = nn.Linear(arch.patch_dim, arch.hidden_size, bias=False, dtype=config.params_dtype)
        spec = layer_spec(causal=False, norm=arch.norm, kernels=kernels)
        self.layers = nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1) for i in range(arch.depth)]
        )
        self.merger = make_projector()
        quarter = arch.head_dim // 4
        f = 1.0 / (arch.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float) / (2 * quarter)))
        self.register_buffer("rope_inv_freq", torch.cat([f, f]), persistent=False)
        self.rope_sections = (quarter, quarter)
        if arch.window_size is not None:
            self.window_units = arch.window_size // arch.patch_size // self.merge
            self.full_layers = set(arch.fullatt_block_indexes)
        else:
            self.window_units = None
            self.full_layers = set(range(arch.depth))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (num_patches, C*T*P*P), grid_thw (num_images, 3) -> (num_patches / 4, out_hidden)."""
        grid_thw = grid_thw.cpu()
        device = pixel_values.device
        unit = self.merge ** 2
        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        pos = vision_position_ids(grid_thw, self.merge)
        cu_full = frame_cu_seqlens(grid_thw)
        if self.window_units is not None:
            window_index, cu_window = window_partition(grid_thw, self.merge, self.window_units)
            perm = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
            hidden = hidden[perm.to(device)]
            pos = pos[:, perm]
        inv_freq = self.rope_inv_freq.to(device)
        full = make_packed_seq_params(cu_full.to(device), _max_len(cu_full), pos.to(device), inv_freq,
                                      self.rope_sections)
        window = full
        if self.window_units is not None:
            window = make_packed_seq_params(cu_window.to(device), _max_len(cu_window), pos.to(device),
                                            inv_freq, self.rope_sections)
        hidden = self._run_layers(hidden.unsqueeze(1), full, window)  # (T, 1, hidden): megatron's [s, b, h]
        merged = self.merger(hidden.squeeze(1))
        if self.window_units is not None:
            merged = merged[torch.argsort(window_index).to(device)]
        return merged

    def _run_layers(self, hidden, full, window):
        """The layers, with megatron's full recompute (which lives in TransformerBlock, not used here) done
        the same way: ``uniform`` checkpoints every chunk of ``recompute_num_layers`` layers, ``block`` only
        the first ``recompute_num_layers`` layers. Selective recompute happens inside each layer's attention."""
        from megatron.core import tensor_parallel

        def run(start, end):
            def forward(h):
                for i in range(start, end):
                    params = full if i in self.full_layers else window
                    h, _ = self.layers[i](h, attention_mask=None, packed_seq_params=params)
                return h

            return forward

        cfg, depth = self.config, len(self.layers)
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
        # Vision layers are numbered locally (the tower lives whole on the first pipeline stage).
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import sharded_state_dict_default

        tp_group = parallel_state.get_tensor_model_parallel_group()  # marks replicated tensors' TP replicas
        out = {}
        for name, module in self.named_children():
            if name == "layers":
                for i, layer in enumerate(module):
                    out.update(layer.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
            else:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=tp_group))
        return out


def build_encoder(arch, vision_config, make_projector, *, kernels: str = "torch") -> VisionTransformer:
    """The encoder part of :mod:`mllm_mega.models.vlm` (``arch``: the whole ModelArch)."""
    return VisionTransformer(vision_config, arch.vision, make_projector, kernels=kernels)


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
