#!/usr/bin/env bash
# One-shot GPU check (README, "GPU check"): kernels, data, pytest -m gpu and a bf16 training run on one GPU,
# in under 9 minutes, with no network. Writes OUT_DIR/summary.md and OUT_DIR/results.json; exit 1 if a
# stage failed.
#   bash tools/gpu_check.sh OUT_DIR              # on an H100/H200
#   bash tools/gpu_check.sh --dry-run OUT_DIR    # on CPU: tiny shapes, the same stages (what CI runs)
# PYTHON=/path/to/python overrides the interpreter (default: .venv/bin/python when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" tools/gpu_check.py "$@"
