"""One torchrun launch (2 ranks) of the Qwen3 checks: ``verify`` of several HF dirs at TP1, TP2 (sequence
parallel) and PP2, then a short TP2 + SP training run whose q/k-norm weights are compared across TP ranks.

  torchrun --nproc_per_node=2 tests/models/qwen3_checks.py OUT.json TRAIN_CONFIG HF_DIR:CKPT [HF_DIR:CKPT ...]

Writes {"verify": {"<hf_dir> tp=.. pp=..": max_abs_diff}, "qk_norm": {...}} (rank 0).
"""
import json
import sys

import torch
import torch.distributed as dist

from mllm_mega.checkpoint.convert import verify
from mllm_mega.training.trainer import Trainer

if __name__ == "__main__":
    out_path, train_config, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = {"verify": {}, "qk_norm": {}}
    for pair in pairs:
        hf_dir, ckpt = pair.split(":")
        for tp, pp in ((1, 1), (2, 1), (1, 2)):
            max_abs, _ = verify(hf_dir, ckpt, tp=tp, pp=pp)
            result["verify"][f"{hf_dir} tp={tp} pp={pp}"] = max_abs

    # after training, before the trainer closes: every q/k-norm weight of this TP rank, gathered to compare
    init, close = Trainer.__init__, Trainer.close

    def qk_norms(model) -> dict:
        return {n: p.detach().float().clone() for n, p in model.named_parameters()
                if "q_layernorm" in n or "k_layernorm" in n}

    def init_and_record(self, cfg):
        init(self, cfg)
        self._qk_start = qk_norms(self.model)  # the loaded (or initial) weights

    def close_and_record(self):
        from megatron.core import parallel_state as ps

        now = qk_norms(self.model)
        names = sorted(now)
        local = torch.stack([now[n] for n in names])
        start = torch.stack([self._qk_start[n] for n in names])
        gathered = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(gathered, local, group=ps.get_tensor_model_parallel_group())
        result["qk_norm"] = {"names": names, "tp_max_diff": float((gathered[0] - gathered[1]).abs().max()),
                             "moved": float((local - start).abs().max())}
        return close(self)

    Trainer.__init__, Trainer.close = init_and_record, close_and_record
    dist.destroy_process_group = lambda *a, **k: None  # keep the world for the result gather below
    from mllm_mega.train import main

    code = main(["--config", train_config])
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({**result, "train_exit": code}, f, indent=1)
    sys.exit(code)
