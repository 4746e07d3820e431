#!/usr/bin/env bash
# Create a virtual environment and install bitnet-a48 with its extras (triton, training, serve, dev).
#   DEPS=locked  (default) the exact versions of requirements.lock: what the tests passed with, on any day
#   DEPS=newest  the newest releases of transformers, peft, accelerate and datasets (CI: drift caught the day it happens)
#   DEPS=lowest  the lower bounds of pyproject.toml (constraints-lowest.txt)
#   VENV=DIR     where to create it (default .venv)
# CPU machines get the CPU build of PyTorch first (TORCH_SPEC), so that the package's `torch` range does not pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEPS=${DEPS:-locked}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
case "$DEPS" in
    locked) CONSTRAINTS=(-c requirements.lock) ;;
    lowest) CONSTRAINTS=(-c constraints-lowest.txt) ;;
    newest) CONSTRAINTS=() ;;
    *) echo "setup_env.sh: DEPS must be locked, newest or lowest, not '$DEPS'" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet -c requirements.lock pip
"${PIP[@]}" install --quiet "$TORCH_SPEC"
"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -e ".[triton,training,serve,dev]"
if [ "$DEPS" = newest ]; then
    "${PIP[@]}" install --quiet --upgrade transformers peft accelerate datasets
fi
"$VENV/bin/python" -c "import torch, transformers, peft, accelerate, datasets, bitnet_a48; print(f'bitnet_a48 {bitnet_a48.__version__} ($DEPS): torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}')"
