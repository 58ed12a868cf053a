#!/usr/bin/env bash
# Compatibility pass: the parity, generate/memory, PEFT-lifecycle, bad-input and 4-bit tests in a separate venv.
#   bash scripts/compat.sh oldest   # the lower bounds pyproject.toml declares (requirements/oldest.txt); .ci/run runs it
#   bash scripts/compat.sh newest   # today's newest releases: try this before raising an upper bound
# It never touches .venv; it prints the versions it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-oldest}
case "$WHICH" in
  oldest) export CONSTRAINTS=requirements/oldest.txt ;;
  newest) CONSTRAINTS=$(mktemp); echo "torch==2.13.0" > "$CONSTRAINTS"; export CONSTRAINTS ;;
  *) echo "usage: bash scripts/compat.sh oldest|newest (got '$WHICH')" >&2; exit 2 ;;
esac
export VENV=.venv-$WHICH EXTRAS=quant,demo,test
if [ "$WHICH" = newest ]; then rm -rf "$VENV"; fi  # always resolve afresh
bash scripts/setup.sh
if [ "$WHICH" = newest ]; then
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" --upgrade transformers peft accelerate bitsandbytes safetensors
fi
"$VENV/bin/python" -m pip freeze | grep -iE "^(torch|transformers|peft|accelerate|bitsandbytes|safetensors|huggingface.hub|tokenizers)=="
"$VENV/bin/python" -W "ignore::RuntimeWarning" -m pytest -q -p no:cacheprovider \
  tests/test_reference_parity.py tests/test_peft_common.py tests/test_bad_inputs.py tests/test_adapter_loading.py \
  tests/test_quantized.py tests/test_compat.py tests/test_adapter.py tests/test_reuse.py tests/test_chat.py \
  tests/test_precision.py
