#!/usr/bin/env bash
# The test command of the README (and of .ci/run): set up .venv, then run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
