#!/usr/bin/env bash
# Create .venv and install dni with its test tools, without pulling a multi-GB CUDA
# build of torch onto a machine that has no NVIDIA GPU.
#
#   bash scripts/setup.sh            # idempotent; re-running is fast
#
# torch: an existing torch in the environment is kept. On a machine with an NVIDIA
# GPU (nvidia-smi works) pip installs its normal (CUDA) torch. Without one, a CPU
# wheel is installed first: from a local wheel folder if pip is configured with one
# (find-links), else from PyTorch's CPU index; pip then sees torch as satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
# pip quietly; its output is shown only when it fails.
pip_q() {
  local out
  if ! out=$("$VPY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1); then
    echo "$out" | grep -v "^WARNING: Location" >&2
    return 1
  fi
}

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found: pip's default (CUDA) torch"
  else
    echo "setup: no NVIDIA GPU: installing a CPU-only torch"
    pip_q --no-index --no-deps torch 2>/dev/null || true  # a local CPU wheel, when pip knows one
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
      pip_q --index-url https://download.pytorch.org/whl/cpu torch
    fi
  fi
fi
pip_q -e ".[dev,cluster]"
"$VPY" -c "import torch, dni; print(f'setup: dni ready (torch {torch.__version__}, cuda={torch.cuda.is_available()})')"
