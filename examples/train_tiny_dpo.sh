#!/usr/bin/env bash
# A tiny preference run whose reward accuracy rises on pairs it has not trained on (CPU, one process):
#   1. SFT: a short captioning/QA run of the tiny Qwen2.5-VL-architecture model on the synthetic shapes
#      conversations (examples/configs/tiny_dpo_sft.yaml, data/tiny_dpo_sft generated on first use);
#   2. MPO: examples/configs/tiny_dpo.yaml started from stage 1 (model.init_from; the frozen reference is
#      the same weights) on distinct synthetic pairs whose rejected caption names another colour
#      (data/tiny_dpo_pairs, synthetic.pair_attributes=[colour], another seed, so no image of stage 1), every
#      pair used once (data.epochs=1): each step's reward accuracy, measured on its batch before the update, is
#      on pairs the model has never seen. It uses stage 1's tokenizer.
#
# Measured as written (2-core VM, idle, 2026-12-02): 4m17s wall including both data generations; SFT 100 steps
# loss 6.1 -> 1.2; MPO (beta 0.5, lr 2e-3 constant) 120 steps over 2808 distinct pairs (~23 a step). Reward
# accuracy on unseen pairs, mean per 10 steps: 2-10 0.47, 11-20 0.51, 21-30 0.48, 31-40 0.52, 41-50 0.70,
# 51-60 0.75, 61-70 0.79, 71-80 0.82, 81-90 0.82, 91-100 0.84, 101-110 0.89, 111-120 0.94. Other seeds
# (SFT_ARGS="seed=7 synthetic.seed=7", stage 2 seed=8 synthetic.seed=8; 4m36s): 0.43, 0.50, 0.50, 0.61, 0.69,
# 0.77, 0.78, 0.74, 0.76, 0.81, 0.77, 0.77. tests/training/test_tiny_dpo_script.py runs it as written.
# Harder pairs do not get there in minutes: with all four attributes (colour, count, shape, position) MPO stays
# at 0.41-0.62 after a 100-step SFT and reaches 0.64 after a 400-step one (~16 min); DPO beta 0.1 from the
# same SFT on colour pairs reaches only 0.59 in 80 steps (beta 0.5: 0.80); from random init, without SFT, DPO
# on colour pairs reaches 0.65 in 80 steps.
# Extra arguments are stage-2 config overrides (e.g. train.max_steps=50); SFT_ARGS holds stage-1 overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SFT_DIR=${SFT_DIR:-runs/tiny_dpo_sft}
RUN_DIR=${RUN_DIR:-runs/tiny_dpo_from_sft}
SFT_DATA=${SFT_DATA:-data/tiny_dpo_sft}
PAIRS=${PAIRS:-data/tiny_dpo_pairs}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}  # megatron-core's and torch's deprecation warnings
# shellcheck disable=SC2086  # SFT_ARGS is a list of overrides
"$PY" -m mllm_mega.train --config examples/configs/tiny_dpo_sft.yaml run_dir="$SFT_DIR" \
    synthetic.dir="$SFT_DATA" ${SFT_ARGS:-}
"$PY" -m mllm_mega.train --config examples/configs/tiny_dpo.yaml run_dir="$RUN_DIR" \
    model.init_from="$SFT_DIR/checkpoints" data.tokenizer_dir="$SFT_DATA/tokenizer" \
    synthetic.dir="$PAIRS" 'synthetic.pair_attributes=[colour]' synthetic.num=4000 synthetic.seed=1 synthetic.multi_image_frac=0 data.epochs=1 \
    data.seq_len=1024 objective.preset=mpo objective.beta=0.5 optimizer.lr=2e-3 optimizer.decay_style=constant \
    train.max_steps=120 logging.log_interval=10 "$@"
"$PY" - "$RUN_DIR" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
bins = {}  # steps 2-10, 11-20, ...: step 1 is all ties (policy = reference), counted as wrong
for r in rows[1:]:
    bins.setdefault((r["iteration"] - 1) // 10, []).append(r)
curve = " ".join(f"{b[0]['iteration']}-{b[-1]['iteration']}: {sum(r['rewards_accuracy'] for r in b) / len(b):.2f}"
                 for b in bins.values())
print(f"reward accuracy on unseen pairs (mean per 10 steps) {curve}; metrics in {sys.argv[1]}/metrics.jsonl")
PYEOF
