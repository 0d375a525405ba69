"""One torchrun launch (2 ranks) of the Valley parity checks: ``verify`` (every case: text, image, several
images, video, batch of two) of the MRoPE dir at TP1, TP2 (sequence parallel) and PP2 (1 + 2 LLM layers), of
the 1-D dir at TP1, and one mismatch (the MRoPE HF dir against the 1-D checkpoint at TP1) that must NOT agree.

  torchrun --nproc_per_node=2 tests/models/valley_checks.py OUT.json MROPE_HF:MROPE_CKPT ONED_HF:ONED_CKPT

Writes {"<name> tp=.. pp=..": max_abs_diff} (rank 0).
"""
import json
import sys

import torch
import torch.distributed as dist

from mllm_mega.checkpoint.convert import verify

if __name__ == "__main__":
    torch.set_num_threads(1)
    out_path, mrope, oned = sys.argv[1], sys.argv[2].split(":"), sys.argv[3].split(":")
    runs = [("mrope", mrope, 1, 1), ("mrope", mrope, 2, 1), ("mrope", mrope, 1, 2),
            ("1d", oned, 1, 1), ("mismatch", (mrope[0], oned[1]), 1, 1)]
    result = {}
    for name, (hf_dir, ckpt), tp, pp in runs:
        # 3 LLM layers: PP2 puts 1 on the ViT's stage, 2 on the other (the documented uneven split)
        max_abs, _ = verify(hf_dir, ckpt, tp=tp, pp=pp, num_llm_layers_in_first_stage=1 if pp > 1 else None)
        result[f"{name} tp={tp} pp={pp}"] = max_abs
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
