#!/bin/bash
# Submit the three training stages as a chain of SLURM jobs: stage 1 -> stage 1.5 -> stage 2. Each stage's
# config starts from the previous stage's run_dir/checkpoints (model.init_from), and each job starts only when
# the previous one has completed successfully (--dependency=afterok; a stage that requeues itself before its
# time limit is not complete until its last attempt finishes). A failed stage cancels the ones after it.
#
#   examples/slurm/stages.sh 7b [sbatch options ...]        # e.g. --nodes=2 --partition=gpu --time=24:00:00
#   examples/slurm/stages.sh 3b --nodes=1
#
# Uses examples/configs/qwen2_5_vl_<size>_{stage1,stage1_5,stage2}.yaml; run it from the repository root.
# Per-stage node counts: NODES_STAGE1, NODES_STAGE1_5, NODES_STAGE2 (default: the sbatch options / script).
set -euo pipefail

SIZE=${1:?usage: examples/slurm/stages.sh 3b|7b [sbatch options ...]}
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

prev=""
for stage in stage1 stage1_5 stage2; do
    config=examples/configs/qwen2_5_vl_${SIZE}_${stage}.yaml
    [[ -f "$config" ]] || { echo "error: $config not found (run from the repository root)" >&2; exit 2; }
    opts=(--parsable --job-name="mllm_${SIZE}_${stage}")
    if [[ -n "$prev" ]]; then
        opts+=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
    fi
    var="NODES_${stage^^}"
    if [[ -n "${!var:-}" ]]; then
        opts+=(--nodes="${!var}")
    fi
    prev=$(sbatch "${opts[@]}" "$@" "$HERE/train.sbatch" "$config")
    prev=${prev%%;*}
    echo "${stage}: job ${prev} (${config})"
done
