#!/usr/bin/env bash
# Compatibility pass: the parity, generate/memory, PEFT-lifecycle, bad-input and 4-bit tests in a separate venv.
#   bash scripts/compat.sh oldest   # the lower bounds pyproject.toml declares (requirements/oldest.txt); .ci/run runs it
#   bash scripts/compat.sh newest   # today's newest releases, past pyproject's caps (torch from PyPI: its CUDA build,
#                                   # which runs on the CPU too): try this before raising an upper bound
# Arguments after the first replace the compatibility pass's test files (`bash scripts/compat.sh newest tests/` runs
# the whole suite; EXTRAS=train,quant,demo,bench,test installs what all of it needs). It never touches .venv; it
# prints the versions it ran on. A machine whose pip config caps torch: PIP_CONSTRAINT=/dev/null for this command.
set -euo pipefail
cd "$(dirname "$0")/.."
WHICH=${1:-oldest}
case "$WHICH" in
  oldest) export CONSTRAINTS=requirements/oldest.txt ;;
  newest) CONSTRAINTS=$(mktemp); export CONSTRAINTS ;;  # nothing pinned: the newest inside pyproject's ranges first
  *) echo "usage: bash scripts/compat.sh oldest|newest [test files] (got '$WHICH')" >&2; exit 2 ;;
esac
shift || true
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_reference_parity.py tests/test_peft_common.py tests/test_bad_inputs.py tests/test_adapter_loading.py
         tests/test_quantized.py tests/test_compat.py tests/test_adapter.py tests/test_reuse.py tests/test_chat.py
         tests/test_precision.py)
fi
export VENV=.venv-$WHICH EXTRAS=${EXTRAS:-quant,demo,test}
if [ "$WHICH" = newest ]; then rm -rf "$VENV"; fi  # always resolve afresh
bash scripts/setup.sh
if [ "$WHICH" = newest ]; then
  # then past the caps: pip warns that beacon-peft asks for less, which is the point of this pass
  "$VENV/bin/python" -m pip install -q --upgrade torch transformers peft accelerate bitsandbytes safetensors \
    >>"$VENV/setup.log" 2>&1 || { tail -30 "$VENV/setup.log" >&2; echo "compat: the upgrade failed ($VENV/setup.log)" >&2
                                   exit 1; }
fi
"$VENV/bin/python" -m pip freeze | grep -iE "^(torch|transformers|peft|accelerate|trl|bitsandbytes|safetensors|huggingface.hub|tokenizers)=="
"$VENV/bin/python" -W "ignore::RuntimeWarning" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
