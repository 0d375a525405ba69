"""The parallel checks of the open_qwen2vl family in one torchrun launch (2 ranks): the SigLIP encoder at TP2
against transformers' ``SiglipVisionModel``, then ``verify`` of a LLaVA(SigLIP + Qwen2) directory at TP2 and PP2.

  torchrun --nproc_per_node=2 tests/models/open_qwen2vl_checks.py OUT.json HF_DIR CKPT

Writes {"encoder_tp2": max_abs_diff, "verify": {"tp=.. pp=..": max_abs_diff}} (rank 0). :func:`encoder_max_diff`
is also the TP1 check of tests/models/test_open_qwen2vl.py (imported from this file).
"""
import json
import sys
from types import SimpleNamespace

import torch


def tiny_siglip(seed: int = 0):
    """A random ``SiglipVisionModel``: head_dim 24 (48 / 2 heads), 3 blocks, 42 px images of 14 px patches."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                             image_size=42, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                             vision_use_head=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


class _Features(torch.nn.Module):
    """A projector slot that passes the encoder's features through (the tower alone is compared)."""

    def forward(self, x, grid_thw):
        return x


def encoder_max_diff(tp: int, num_layers_used: int = 2) -> float:
    """max |ours - SiglipVisionModel.hidden_states[num_layers_used]| over two images (megatron initialised at TP
    ``tp`` here; each rank loads its slice of the full weights)."""
    from megatron.core import parallel_state as ps

    from mllm_mega.models.encoders.siglip import SiglipEncoder, SiglipVisionArch, vision_transformer_config
    from mllm_mega.models.families.open_qwen2vl.hf_keys import hf_to_ours, vision_key_pairs
    from mllm_mega.models.llms.causal_lm import _common
    from mllm_mega.parallel.initialize import initialize_distributed

    initialize_distributed(tp, 1)
    hf = tiny_siglip()
    c = hf.config
    arch = SiglipVisionArch(num_layers=c.num_hidden_layers, num_layers_used=num_layers_used,
                            hidden_size=c.hidden_size, ffn_hidden_size=c.intermediate_size,
                            num_heads=c.num_attention_heads, out_hidden_size=c.hidden_size, image_size=c.image_size,
                            patch_size=c.patch_size)
    enc = SiglipEncoder(vision_transformer_config(arch, _common(torch.float32, True, tp, 1)), arch, _Features).eval()
    hf_state = {k.replace("vision_model.", ""): v for k, v in hf.state_dict().items()}
    full = dict(hf_to_ours(SimpleNamespace(vision=arch, text=None), hf_state.__getitem__,
                           pairs=vision_key_pairs(arch, ours="", hf="")))
    rank = ps.get_tensor_model_parallel_rank()
    local = {}
    for k, mine in enc.state_dict().items():
        if not isinstance(mine, torch.Tensor) or k.endswith("_extra_state"):
            continue
        w = full[k]
        split = [d for d in range(w.dim()) if w.shape[d] != mine.shape[d]]
        local[k] = w.chunk(tp, split[0])[rank] if split else w  # column-parallel dim 0, row-parallel dim 1
    enc.load_state_dict(local, strict=False)
    assert set(full) == set(local), sorted(set(full) ^ set(local))
    pixels = torch.randn(2, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(1))
    grid = torch.tensor([[1, arch.grid, arch.grid]] * 2)
    with torch.no_grad():
        ours = enc(pixels, grid)
        ref = hf(pixels, output_hidden_states=True).hidden_states[num_layers_used].reshape(-1, c.hidden_size)
    return float((ours - ref).abs().max()), float(ref.abs().max())


if __name__ == "__main__":
    import torch.distributed as dist

    from mllm_mega.checkpoint.convert import verify

    out_path, hf_dir, ckpt = sys.argv[1:4]
    result = {"encoder_tp2": encoder_max_diff(2), "verify": {}}
    for tp, pp in ((2, 1), (1, 2)):
        result["verify"][f"tp={tp} pp={pp}"] = verify(hf_dir, ckpt, tp=tp, pp=pp)[0]
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.destroy_process_group()
