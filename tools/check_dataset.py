#!/usr/bin/env python
"""Run every sample of a WebDataset shard set through the training data pipeline once and report.

    python tools/check_dataset.py --data DIR [--config FILE] [--tokenizer DIR] [--seq-len N] [--preference]
        [--model HF_DIR]

Reads, validates, tokenizes, packs, decodes (with the configured decoder), resizes and patchifies every
sample, exactly as training does (one epoch, data-parallel size 1). Skipped samples are listed on stderr
with their reason; the last line of stdout is a JSON summary:
    {"samples_ok": N, "skipped": {"<reason>": n, ...}, "packs": P, "packing_efficiency": e, ...}
--config is a YAML file of DataConfig keys (top level or under ``data:``); --data overrides its data_path.
Without --config or --tokenizer, a ``tokenizer`` directory next to or above DIR is used. --preference (or
``preference: true`` in the config) checks preference pairs: samples_ok counts pairs and the skip reasons
include the pair_* ones (a missing/empty/identical completion, a pair longer than seq_len). --model HF_DIR:
process images as that model's family does in training (e.g. Open-Qwen2VL's fixed resolution, k*k tokens per
image); default Qwen2-VL's dynamic resolution.
"""
from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from mllm_mega.data.config import DataConfig, tool_config
from mllm_mega.data.loader import build_train_loader
from mllm_mega.models.registry import loader_options_of


def check(cfg: DataConfig, *, show_skips: int = 20, progress: bool = True, loader_options: dict | None = None) -> dict:
    """One epoch of the training loader over ``cfg``'s data; ``loader_options``: a family's (the image scheme)."""
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, **(loader_options or {}))
    samples_per_pack, images_per_pack = [], []
    with tqdm(desc="checking", unit="pack", disable=not (progress and sys.stderr.isatty())) as bar:
        for batch in loader:
            samples_per_pack.append(batch["num_samples"])
            images_per_pack.append(batch["num_images"] + batch["num_videos"])
            bar.update(1)
            bar.set_postfix(samples=loader.stats["samples"], skipped=sum(loader.skip_counts.values()))
    for reason, key, message in loader.recent_skips[-show_skips:]:
        print(f"skipped [{reason}] {key}: {message}", file=sys.stderr)
    stats = loader.stats
    packs = stats["packs"]
    return {
        "samples_ok": stats["samples"],
        "skipped": dict(sorted(loader.skip_counts.items())),
        "skipped_total": sum(loader.skip_counts.values()),
        "packs": packs,
        "packing_efficiency": round(stats["real_tokens"] / (packs * cfg.seq_len), 6) if packs else 0.0,
        "tokens": stats["real_tokens"],
        "images": stats["images"],
        "videos": stats["videos"],
        "samples_per_pack": round(sum(samples_per_pack) / packs, 3) if packs else 0.0,
        "max_images_per_pack": max(images_per_pack, default=0),
        "seq_len": cfg.seq_len,
        "shards": len(loader.shards),
        "decoder": loader.decoder_name,
        "preference": cfg.preference,
        **({"per_dataset": stats["per_dataset"]} if "per_dataset" in stats else {}),  # data.datasets mixtures
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="shard directory, glob or file (overrides the config's data_path)")
    parser.add_argument("--config", help="YAML file of DataConfig keys")
    parser.add_argument("--tokenizer", help="tokenizer directory (overrides the config's tokenizer_dir)")
    parser.add_argument("--seq-len", type=int, help="override seq_len")
    parser.add_argument("--decoder", choices=("auto", "dali", "pil"), help="override the decoder")
    parser.add_argument("--preference", action="store_true", default=None,
                        help="the samples are preference pairs (prompt, chosen, rejected)")
    parser.add_argument("--model", help="HF model directory: process images as its family does in training")
    parser.add_argument("--show-skips", type=int, default=20, help="skipped samples to list on stderr")
    args = parser.parse_args(argv)
    try:
        cfg = tool_config(args.data, args.config, args.tokenizer, seq_len=args.seq_len, decoder=args.decoder,
                          preference=args.preference,
                          epochs=1, max_consecutive_skips=0)  # one pass that reports every skip
        loader_options = loader_options_of(args.model) if args.model else None
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    try:
        summary = check(cfg, show_skips=args.show_skips, loader_options=loader_options)
    except FileNotFoundError as exc:  # a wrong data path: named, no traceback
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
