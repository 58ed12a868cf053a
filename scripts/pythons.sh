#!/usr/bin/env bash
# The lock on other Pythons (docs/versions.md, "Pythons").
#   bash scripts/pythons.sh 3.12 3.13                  # per Python: .venv-py312 ... at the lock (scripts/setup.sh),
#                                                      # then the whole suite there
#   bash scripts/pythons.sh 3.13 -- tests/test_grouped.py -x   # pytest's arguments after `--`: a part of the suite
#   bash scripts/pythons.sh --wheels 3.11 3.12 3.13    # no install: does every pin of requirements/lock.txt and
#                                                      # lock-cuda.txt have a wheel for these Pythons (Linux x86_64)?
# The interpreter: python3.X on PATH, else pyenv's newest 3.X. TORCH= is passed to scripts/setup.sh (where PyTorch's
# CPU index cannot be reached and no CPU wheel lies on pip's find-links for that Python, use TORCH=cuda: PyPI's build
# runs on the CPU too). Stops at the first Python that fails; prints one line per Python with its pytest summary.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/pythons.sh [--wheels] 3.X [3.Y ...] [-- pytest args] (got: $*)" >&2; exit 2; }

WHEELS=0
if [ "${1:-}" = --wheels ]; then WHEELS=1; shift; fi
versions=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  [[ "$1" =~ ^3\.[0-9]+$ ]] || usage "$@"
  versions+=("$1"); shift
done
[ "${1:-}" = -- ] && shift
[ ${#versions[@]} -gt 0 ] || usage "$@"

if [ "$WHEELS" = 1 ]; then
  PY=${PYTHON:-$(command -v python3)}
  # this machine's Linux x86_64 platform tags (pip does not widen a manylinux_2_X tag to the older ones by itself)
  mapfile -t PLATFORMS < <("$PY" -c "
from pip._vendor.packaging import tags
print('\n'.join(sorted({t.platform for t in tags.sys_tags()} - {'any'})))")
  CERT=()
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then CERT=(--cert /etc/ssl/certs/ca-certificates.crt); fi
  for v in "${versions[@]}"; do
    REPORT=$(mktemp)
    # --isolated: PyPI only (pip's local config may add a wheel folder or a constraint file); --no-deps: only the
    # pins themselves, each must exist as a wheel (sdists would need a compiler); torch is PyPI's build
    "$PY" -m pip --isolated install "${CERT[@]}" --dry-run --target "$(mktemp -d)" --ignore-installed --no-deps --only-binary=:all: --quiet \
      --index-url https://pypi.org/simple --python-version "$v" --implementation cp \
      "${PLATFORMS[@]/#/--platform=}" --report "$REPORT" -r requirements/lock.txt -r requirements/lock-cuda.txt \
      || { echo "pythons: Python $v: pip found no wheel for a pin of requirements/lock.txt or lock-cuda.txt (above)" >&2
           exit 1; }
    n=$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['install']))" "$REPORT")
    echo "pythons: Python $v: all $n pins of requirements/lock.txt + lock-cuda.txt have a wheel (Linux x86_64)"
  done
  exit 0
fi

find_python() {  # one that runs (a pyenv shim of a version not selected is on PATH but does not run)
  local v=$1 found
  found=$(command -v "python$v" || true)
  if { [ -z "$found" ] || ! "$found" -c "" 2>/dev/null; } && command -v pyenv >/dev/null 2>&1; then
    found=$(ls -d "$(pyenv root)/versions/$v".*/bin/"python$v" 2>/dev/null | sort -V | tail -1 || true)
  fi
  if [ -n "$found" ] && "$found" -c "" 2>/dev/null; then echo "$found"; fi
}
summary=()
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  if [ -z "$py" ]; then echo "pythons: no Python $v here (python$v on PATH or under pyenv)" >&2; exit 2; fi
  venv=.venv-py${v/./}
  echo "pythons: Python $v ($py) in $venv" >&2
  VENV=$venv PYTHON=$py bash scripts/setup.sh
  log=$(mktemp)
  set +e
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  summary+=("Python $v: $(grep -E '(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | sed 's/^ *//') (rc $rc)")
  if [ "$rc" != 0 ]; then break; fi
done
printf 'pythons: %s\n' "${summary[@]}"
[ "${rc:-0}" = 0 ]
