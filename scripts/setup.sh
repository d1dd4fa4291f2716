#!/usr/bin/env bash
# Create .venv and install the project with its test dependencies.
# TORCH_SPEC picks the PyTorch build: the default pins the CPU release that
# this project is tested with; pass e.g. TORCH_SPEC='torch>=2.4' to keep yours.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
