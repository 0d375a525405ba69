#!/usr/bin/env bash
# The CPU demo of the model stack: a tiny random Qwen2.5-VL in HF format -> mllm_mega dist checkpoint ->
# logits compared with HF transformers at TP=2 (sequence parallel) and at PP=2 (2 gloo processes each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${WORK:-runs/demo}
rm -rf "$WORK"
"$PY" tools/make_tiny_hf_model.py --family qwen2_5_vl --out "$WORK/hf"
"$PY" tools/convert_checkpoint.py import-hf --hf-dir "$WORK/hf" --out "$WORK/ckpt"
for layout in "--tp 2" "--pp 2"; do
  echo "== verify $layout"
  "$PY" -m torch.distributed.run --nproc_per_node=2 tools/convert_checkpoint.py verify \
      --hf-dir "$WORK/hf" --load "$WORK/ckpt" $layout 2>&1 | grep -E "^\[verify\]|^max_abs_diff|^error"
done
