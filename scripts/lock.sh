#!/usr/bin/env bash
# Refresh the locks: resolve the newest releases inside the declared ranges in a scratch venv, run the whole suite
# there, and only if it passes write the frozen versions to requirements/lock.txt (review the diff). Then resolve
# what PyPI's CUDA build of the locked torch needs beside them (metadata only, nothing downloaded but the index)
# and write it to requirements/lock-cuda.txt, which scripts/setup.sh adds for TORCH=cuda. Last, check that every pin
# has a wheel for each Python setup.sh lists as tested (TESTED_PYTHONS; scripts/pythons.sh --wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH=.venv-lock
rm -rf "$SCRATCH"
CONSTRAINTS=$(mktemp); echo "torch==2.13.0" > "$CONSTRAINTS"
VENV=$SCRATCH CONSTRAINTS=$CONSTRAINTS TORCH=cpu bash scripts/setup.sh
"$SCRATCH/bin/python" -m pytest -q -p no:cacheprovider
{ sed -n '1,3p' requirements/lock.txt
  "$SCRATCH/bin/python" -m pip freeze --exclude-editable | grep -v '^-e' | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/'
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "requirements/lock.txt rewritten; git diff requirements/lock.txt"
bash scripts/lock_cuda.sh
# every declared Python must find a wheel for every pin (then run the suite there: bash scripts/pythons.sh 3.12 3.13)
read -ra PYTHONS <<<"$(sed -n 's/^TESTED_PYTHONS="\([0-9. ]*\)".*/\1/p' scripts/setup.sh)"
bash scripts/pythons.sh --wheels "${PYTHONS[@]}"
