#!/usr/bin/env bash
# GPU check: ResNet-56 on CIFAR-shaped data through sctune's real pipeline (range tests, packed
# one-cycle trials at --gpus-per-trial 0.25, a lone final fit), with bf16 autocast and channels_last.
# Prints samples/s per trial and per stage, GPU memory (per trial and nvidia-smi), trials packed per
# GPU, and writes OUT (JSON) plus OUT with .md (a table). Needs no internet: without CIFAR-10 under
# ~/.cache/sctune it uses the synthetic_cifar stand-in.
#
#   benchmarks/gpu_check.sh --out results/gpu_check.json           # GPU machine: a few minutes
#   benchmarks/gpu_check.sh --out /tmp/gpu_check.json --tiny       # any machine, CPU, ~1 minute
#   benchmarks/gpu_check.sh --out r.json --trials 16 --epochs 5    # more: see --help
#
# Python: $PYTHON if set, else the repository's .venv, else python3 (it needs sctune's
# dependencies: torch, ray[tune], optuna, pandas, tensorboard, pyyaml, scikit-learn, matplotlib).
# Exit codes: 0 ok, 1 a stage stopped (see the JSON), 2 error, 3 no GPU (use --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv || true
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
