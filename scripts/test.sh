#!/usr/bin/env bash
# Sets up, builds and runs every test (unit, golden against transformers fixtures, tokenizer and
# chat templates against transformers/jinja2, CLI end to end, the safetensors fuzz pass; GPU
# tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup-python.sh
scripts/build.sh
cd build
ctest -j "$(nproc)" --output-on-failure "$@"
