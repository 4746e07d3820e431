#!/usr/bin/env bash
# Rewrite requirements.lock from an environment the whole test suite passed in (default .venv):
#   VENV=.venv bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
{
    echo "# The exact versions the test suite passed with (Python 3.11, x86_64, CPU build of torch), written by"
    echo "# scripts/lock.sh. scripts/setup_env.sh installs through it, so README's commands give the same result on any day;"
    echo "# .ci/run also tests the newest releases and the lower bounds (constraints-lowest.txt)."
    echo "pip==$("$VENV/bin/python" -m pip --version | cut -d' ' -f2)"
    # the CPU build's local label (+cpu) is left out: `torch==X.Y.Z` matches it and the CPU file on disk
    "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
} > requirements.lock
echo "requirements.lock: $(grep -c '==' requirements.lock) pins"
