#!/usr/bin/env bash
# Grouped execution on a lent GPU (device tool), one call of about 8 minutes (scripts/device/grouped.py says what
# it measures). Here, where PyPI is reachable:
#   bash scripts/device/pack.sh slim       # the tracked tree (~150 MB) must go out slim (pack.sh unslim after)
#   bash scripts/device/grouped.sh pack    # .gpu/g: the lock's transformers and peft + bitsandbytes (CUDA 13), ~56 MB
# then one device call, carry [".gpu/g"], command:
#   bash scripts/device/grouped.sh run     # installs the wheels, runs grouped.py; tables on stdout, rows in $OUT
set -uo pipefail
cd "$(git rev-parse --show-toplevel)"
case "${1:-}" in
  pack)
    set -e
    EXCLUDE=$(git rev-parse --git-path info/exclude)
    grep -qxF "/.gpu/" "$EXCLUDE" 2>/dev/null || echo "/.gpu/" >> "$EXCLUDE"
    if [ -e .gpu/g ]; then echo "grouped.sh: .gpu/g exists; remove it first (nothing is overwritten)" >&2; exit 1; fi
    mkdir -p .gpu/g
    v() { grep -i "^$1==" requirements/lock.txt; }
    "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      -d .gpu/g "$(v transformers)" "$(v peft)" "$(v bitsandbytes)"
    du -cb .gpu/g/* | tail -1; exit 0 ;;
  run) ;;
  *) echo "usage: grouped.sh pack|run" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site:$PWD:$PWD/tests
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/g/*.whl \
  || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
OUT=${OUT:-/tmp}
# the budget: (a) ~4 min, (b) ~2 min, (c) ~1.5 min on an H200; each part stops the script only by itself
timeout 300 python3 scripts/device/grouped.py --parts prefill --out "$OUT/grouped.jsonl" 2>&1 | grep -vi warn \
  | tee "$OUT/prefill.log"
timeout 150 python3 scripts/device/grouped.py --parts qlora --out "$OUT/grouped.jsonl" 2>&1 | grep -vi warn \
  | tee "$OUT/qlora.log"
timeout 120 python3 scripts/device/grouped.py --parts readback --out "$OUT/grouped.jsonl" 2>&1 | grep -vi warn \
  | tee "$OUT/readback.log"
