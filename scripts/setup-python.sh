#!/usr/bin/env bash
# Creates .venv with the test-only Python tools (transformers' tokenizer without torch, jinja2)
# pinned in tests/requirements.txt. Reinstalls only when the requirements change.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements
if [ -x .venv/bin/python ] && cmp -s tests/requirements.txt "$stamp"; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
cp tests/requirements.txt "$stamp"
