#!/usr/bin/env bash
# Issue 7 check on a 2-GPU device machine: the fast path under DeepSpeed ZeRO-2 at N = 1 and N = 2, same global batch.
# Usage (device tool, carry .whl): bash bench/run_zero2.sh [arch]
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
ARCH=${1:-gpt_neox_1.4b}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl/ds/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_MININTERVAL=30
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/env.txt"
status=0
for n in 1 2; do
  timeout 180 python3 -m accelerate.commands.launch --config_file accelerate_config.yaml --num_processes "$n" \
    bench/zero2_first_step.py --arch "$ARCH" --out "$OUT/zero2_${ARCH}_n$n.json" > "$OUT/zero2_n$n.log" 2>&1 || status=1
  grep -E '^\{"world|Error' "$OUT/zero2_n$n.log" | tail -3
done
python3 bench/zero2_first_step.py --compare "$OUT/zero2_${ARCH}_n1.json" "$OUT/zero2_${ARCH}_n2.json" \
  --compare-out "$OUT/zero2_${ARCH}_compare.json" || status=1
exit $status
