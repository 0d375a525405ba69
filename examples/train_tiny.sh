#!/usr/bin/env bash
# The main job on any machine (CPU when there is no GPU): train the tiny Qwen2.5-VL-architecture model from
# scratch on the synthetic shapes dataset (generated on first use) with 2 processes (TP=2), then caption
# held-out images with greedy decoding. Extra arguments are config overrides, e.g. train.max_steps=50.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/tiny_synthetic}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron-core's and torch's deprecation warnings
"$PY" -m torch.distributed.run --nproc_per_node=2 -m mllm_mega.train \
    --config examples/configs/tiny_synthetic.yaml run_dir="$RUN_DIR" "$@"
"$PY" - "$RUN_DIR" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
first, last = rows[0], rows[-1]
print(f"loss: {first['loss']:.3f} at iteration {first['iteration']} -> {last['loss']:.3f} at iteration "
      f"{last['iteration']}; metrics in {sys.argv[1]}/metrics.jsonl, plot: tools/plot_metrics.py {sys.argv[1]}")
PYEOF
