#!/usr/bin/env bash
# The CUDA paths on a machine with an NVIDIA GPU: CUDA training, export, onnxruntime's CUDA
# provider against its CPU provider (parity within 1e-4, images/s at batch 1 and 32) and
# `convserve serve` with CONVSERVE_DEVICE=cuda. Needs convserve's training and service
# dependencies with torch's CUDA build and onnxruntime-gpu:
#   make venv && .venv/bin/pip install 'onnxruntime-gpu[cuda,cudnn]'
#   benchmarks/gpu_check.sh                 # PYTHON=... to use another interpreter
# Extra arguments go to gpu_check.py (--steps, --seconds; --device cpu checks the script
# itself on a machine without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py "$@"
