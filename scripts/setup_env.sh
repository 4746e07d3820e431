#!/usr/bin/env bash
# Create .venv and install bitnet-a48 with its extras. CPU machines get the CPU build of PyTorch first, so that the
# package's `torch` range does not pull a multi-GB CUDA build; set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[triton,training,dev]"
.venv/bin/python -c "import torch, transformers, bitnet_a48; print(f'bitnet_a48 {bitnet_a48.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
