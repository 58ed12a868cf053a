#!/usr/bin/env bash
# The read-back training run on a lent GPU (device tool), in two calls a warm machine keeps apart by /tmp only
# (scripts/device/pack.sh builds the carried folders and the slim tree; see there):
#   bash scripts/device/readback.sh stage   # carry .gpu/a: install the wheels, keep SmolLM2's first part, GPU smoke
#   bash scripts/device/readback.sh train   # carry .gpu/b: join SmolLM2, unpack the init adapter, train $CONFIG for
#                                           # $MINUTES ($EXTRA: more train_readback.py arguments), leave the adapter
#                                           # (bf16, split under the 16 MiB transfer limit), logs and curve in $OUT
set -uo pipefail
MINUTES=${MINUTES:-5}
CONFIG=${CONFIG:-recipes/configs/readback/smollm2-135m-long-rows-gpu.yaml}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 BEACON_PEFT_CACHE=/tmp/bpcache
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
case "${1:-}" in
  stage)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .gpu/a/*.whl || exit 1
    cp .gpu/a/llm.tar.xz.part1 /tmp/
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    python3 scripts/device/smoke.py; exit $? ;;
  train) ;;
  *) echo "usage: readback.sh stage|train"; exit 2 ;;
esac
cat /tmp/llm.tar.xz.part1 .gpu/b/llm.tar.xz.part2 | xz -d | tar -x -C /tmp/site || exit 1
mkdir -p adapters && tar -xJf .gpu/b/adapter.tar.xz -C adapters || exit 1  # the slim tree has no adapters/
python3 recipes/train_readback.py --config "$CONFIG" --output_dir /tmp/rb --max_minutes "$MINUTES" ${EXTRA:-} 2>&1 \
  | grep -v -i warn | tee "$OUT/train.log"
python3 - <<'PY'
import torch
from safetensors.torch import load_file, save_file
sd = load_file("/tmp/rb/final/adapter_model.safetensors")
save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, "/tmp/rb/adapter_bf16.safetensors")
PY
split -b 15m /tmp/rb/adapter_bf16.safetensors "$OUT/adapter_bf16.part-"
(cd /tmp/rb && tar czf "$OUT/meta.tar.gz" curve.json train_log.jsonl final/adapter_config.json final/readback_args.json \
  final/README.md 2>/dev/null)
