#!/usr/bin/env bash
# The main job on any machine (CPU when there is no GPU): train the tiny Qwen2.5-VL-architecture model from
# scratch on the synthetic shapes dataset (generated on first use) with 2 processes (TP=2), then caption
# held-out images with greedy decoding. Extra arguments are config overrides, e.g. train.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/tiny_synthetic}
"$PY" -m torch.distributed.run --nproc_per_node=2 -m mllm_mega.train \
    --config examples/configs/tiny_synthetic.yaml run_dir="$RUN_DIR" "$@" 2> >(grep -v -i "warn" >&2)
"$PY" - "$RUN_DIR" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"loss fell from {first['loss']:.3f} (iteration {first['iteration']}) to {last['loss']:.3f} "
      f"(iteration {last['iteration']}); metrics in {sys.argv[1]}/metrics.jsonl")
PYEOF
