"""Training entry point.

    torchrun --nproc_per_node=N -m mllm_mega.train --config examples/configs/X.yaml [dotted.key=value ...]

e.g. ``run_dir=runs/a train.max_steps=100 checkpoint.save_interval=50``. The run resumes automatically from
``run_dir/checkpoints``; SIGTERM/SIGUSR1 save and exit 0. Exit codes: 0 done (or stopped by a signal after
saving), 1 stopped by the NaN guard or a failed save (e.g. disk full), 2 bad configuration or inputs (a layout
that does not divide the world size, a run_dir held by another run, a resume with a config that breaks exact
continuation).
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
                     multi_image_frac=s.multi_image_frac, caption_frac=s.caption_frac, progress=True,
                     preference=cfg.data.preference,  # preference pairs for objective.name=preference
                     pair_attributes=s.pair_attributes)
        with open(os.path.join(tmp, "data.yaml"), "w") as f:  # point it at the final location
            d = os.path.abspath(s.dir)
            f.write(f"data_path: {d}/train\neval_data_path: {d}/eval\ntokenizer_dir: {d}/tokenizer\n"
                    + ("preference: true\n" if cfg.data.preference else ""))
        os.replace(tmp, s.dir)
    dist.barrier()


def caption_eval(trainer) -> list[dict]:
    """Greedy captions of held-out images, printed beside the true ones (written to run_dir/captions.jsonl)."""
    import torch.distributed as dist

    from mllm_mega.data.eval_samples import build_eval_samples
    from mllm_mega.training.generate import greedy_generate

    cfg, text = trainer.cfg, trainer.text
    if not cfg.train.eval_num_captions or not cfg.data.eval_data_path or not trainer.spec.has_vision:
        return []
    samples = build_eval_samples(cfg.data, max_samples=cfg.train.eval_num_captions,
                                 **trainer.spec.eval_options(trainer.arch))
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


def startup(cfg):
    """Collective, before anything is written into run_dir: rank 0 takes the run lock, removes a crashed run's
    partial files, refuses a resume whose config breaks exact continuation, then writes config.yaml. Any
    refusal is raised as ValueError on every rank (exit 2). Returns the lock (rank 0) or None."""
    import torch.distributed as dist
    import yaml

    from mllm_mega.training import resume
    from mllm_mega.training.checkpointing import atomic_write_text, complete_iterations, read_tracker
    from mllm_mega.training.run_lock import RunLock

    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            os.makedirs(cfg.run_dir, exist_ok=True)
            lock = RunLock(cfg.run_dir)
            lock.acquire()
            resume.remove_partial_saves(cfg.run_dir)
            ckpt_dir = os.path.join(cfg.run_dir, "checkpoints")
            if cfg.checkpoint.resume and (complete_iterations(ckpt_dir) or read_tracker(ckpt_dir) != (None, None)):
                resume.check_config_change(cfg.run_dir, cfg.to_dict(), allow=cfg.train.allow_config_change)
            path = os.path.join(cfg.run_dir, "config.yaml")
            try:
                atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            except OSError as e:
                raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
        except ValueError as e:
            error = str(e)
            if lock is not None:
                lock.release()  # only removes the lock if this run took it
            lock = None
    box = [error]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ValueError(box[0])
    return lock


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
    from mllm_mega.training.checkpointing import CheckpointSaveError
    from mllm_mega.training.trainer import NaNStop, Trainer

    code, lock = 0, None
    try:
        initialize_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed,  # a bad layout: exit 2
                               context_parallel_size=cfg.parallel.cp)  # context parallel
        ensure_synthetic_dataset(cfg)
        lock = startup(cfg)
        trainer = Trainer(cfg)
        try:
            trainer.train()
            if not trainer.stopped_early:
                caption_eval(trainer)
        finally:
            trainer.close()
    except (NaNStop, CheckpointSaveError) as e:
        if dist.get_rank() == 0 or isinstance(e, CheckpointSaveError):
            _error(e)
        code = 1
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        code = 2
    except OSError as e:  # e.g. a full disk outside a checkpoint save (its message names the file)
        _error(e)
        code = 1
    finally:
        if lock is not None:
            lock.release()
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
