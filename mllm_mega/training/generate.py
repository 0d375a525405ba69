"""Greedy decoding with the training model (any TP/PP layout), for the end-of-run captioning check.

No KV cache: each new token re-runs the prompt plus the tokens so far through megatron's forward-only
pipeline schedule — fine for the few short captions of an evaluation, not a serving path. Generated text
tokens continue the MRoPE positions after the prompt's largest position, as in HF's generate().
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mllm_mega.parallel.schedule import forward_only


@torch.no_grad()
def greedy_generate(model, sample: dict, *, max_new_tokens: int, stop_ids: set[int], vocab_limit: int) -> list[int]:
    """Tokens generated after ``sample['input_ids']`` (a build_eval_samples item); collective over all ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    tp = ps.get_tensor_model_parallel_world_size()
    sp = model.config.sequence_parallel
    prompt, prompt_pos = sample["input_ids"], sample["position_ids"]
    next_pos = int(prompt_pos.max()) + 1
    out: list[int] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for step in range(max_new_tokens):
        gen = torch.tensor(out, dtype=torch.int64)
        ids = torch.cat([prompt, gen])
        pos = torch.cat([prompt_pos, (next_pos + torch.arange(len(out))).expand(3, -1)], dim=1)
        real = ids.shape[0]
        pad = (-real) % tp if sp else 0
        bounds = [0, real] + ([real + pad] if pad else [])
        batch = {
            "input_ids": torch.nn.functional.pad(ids, (0, pad)),
            "position_ids": torch.nn.functional.pad(pos, (0, pad)),
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "pixel_values": sample["pixel_values"],
            "image_grid_thw": sample["image_grid_thw"],
        }
        batch = {k: v.to(device) for k, v in batch.items()}
        seq = (real + pad) // tp if sp else real + pad
        logits = forward_only(model, batch, seq)
        token = torch.zeros(1, dtype=torch.int64, device=device)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)[real - 1].float()
            full[vocab_limit:] = float("-inf")  # padded vocabulary rows are never tokens
            token[0] = int(full.argmax())
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(token, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        t = int(token[0])
        if t in stop_ids:
            break
        out.append(t)
    return out
