"""Training entry point.

    torchrun --nproc_per_node=N -m mllm_mega.train --config examples/configs/X.yaml [dotted.key=value ...]

e.g. ``run_dir=runs/a train.max_steps=100 checkpoint.save_interval=50``. The run resumes automatically from
``run_dir/checkpoints``; SIGTERM/SIGUSR1 save and exit 0. Exit codes: 0 done (or stopped by a signal after
saving), 1 stopped by the NaN guard, 2 bad configuration or inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m mllm_mega.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (examples/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10")
    return p.parse_args(argv)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _error(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def ensure_synthetic_dataset(cfg) -> None:
    """Generate the configured synthetic dataset on rank 0 when absent (to a temporary name, then renamed)."""
    import shutil

    import torch.distributed as dist

    s = cfg.synthetic
    if not s.dir or os.path.isfile(os.path.join(s.dir, "meta.json")):
        return
    if dist.get_rank() == 0:
        from mllm_mega.data.synthetic import make_dataset

        print(f"[train] generating the synthetic dataset at {s.dir} ({s.num} samples)", flush=True)
        tmp = os.path.abspath(s.dir.rstrip("/") + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_dataset(tmp, s.num, s.seed, num_eval=s.num_eval, size_range=tuple(s.image_size),
                     multi_image_frac=s.multi_image_frac, caption_frac=s.caption_frac, progress=True)
        with open(os.path.join(tmp, "data.yaml"), "w") as f:  # point it at the final location
            d = os.path.abspath(s.dir)
            f.write(f"data_path: {d}/train\neval_data_path: {d}/eval\ntokenizer_dir: {d}/tokenizer\n")
        os.replace(tmp, s.dir)
    dist.barrier()


def caption_eval(trainer) -> list[dict]:
    """Greedy captions of held-out images, printed beside the true ones (written to run_dir/captions.jsonl)."""
    import torch.distributed as dist

    from mllm_mega.data.eval_samples import build_eval_samples
    from mllm_mega.training.generate import greedy_generate

    cfg, text = trainer.cfg, trainer.text
    if not cfg.train.eval_num_captions or not cfg.data.eval_data_path:
        return []
    samples = build_eval_samples(cfg.data, max_samples=cfg.train.eval_num_captions,
                                 spatial_merge_size=trainer.arch.vision.spatial_merge_size)
    trainer.model.eval()
    rows = []
    for s in samples:
        ids = greedy_generate(trainer.model, s, max_new_tokens=cfg.train.eval_max_new_tokens,
                              stop_ids={text.end_of_text_id, text.end_of_turn_id}, vocab_limit=text.vocab_size)
        rows.append({"key": s["key"], "true": s["caption"],
                     "generated": text.tokenizer.decode(ids, skip_special_tokens=True).strip()})
    if dist.get_rank() == 0:
        print("[eval] greedy captions of held-out images:", flush=True)
        for r in rows:
            print(f"[eval] {r['key']}\n         true:      {r['true']}\n         generated: {r['generated']}",
                  flush=True)
        with open(os.path.join(cfg.run_dir, "captions.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def main(argv=None) -> int:
    args = _parse(argv)
    from mllm_mega.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        return 2
    import torch.distributed as dist

    from mllm_mega.parallel.initialize import initialize_distributed
    from mllm_mega.training.checkpointing import atomic_write_text
    from mllm_mega.training.trainer import NaNStop, Trainer

    initialize_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed)
    code = 0
    try:
        ensure_synthetic_dataset(cfg)
        if dist.get_rank() == 0:
            import yaml

            os.makedirs(cfg.run_dir, exist_ok=True)
            atomic_write_text(os.path.join(cfg.run_dir, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        trainer = Trainer(cfg)
        try:
            trainer.train()
            if not trainer.stopped_early:
                caption_eval(trainer)
        finally:
            trainer.close()
    except NaNStop as e:
        if dist.get_rank() == 0:
            _error(e)
        code = 1
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        code = 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
