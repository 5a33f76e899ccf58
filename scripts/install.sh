#!/usr/bin/env bash
# Install grokserve into ./.venv on a fresh machine (Python ≥3.11 and pip are all it needs).
# CPU machines get torch 2.13.0 (CPU build) explicitly: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -z "${GROKSERVE_KEEP_TORCH:-}" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
PYTHON=.venv/bin/python bash scripts/get_helm.sh   # the chart tests render with a real Helm engine
