#!/usr/bin/env bash
# The main command of the README: set up .venv, then read a long held-out essay with a hidden pass key on
# SmolLM2-135M through a beacon adapter and print the answer and the KV memory held.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/beacon-peft demo "$@"
