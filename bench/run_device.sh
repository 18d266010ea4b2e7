#!/usr/bin/env bash
# The benchmark on the lent GPU machine (see bench/README.md): installs the carried wheels, records the environment,
# runs the GPU attention tests and bench_dpo.py once per argument group ("arch[:extra flags]"), logs under $OUT.
# PARALLEL=1 runs group i on GPU i, all at once; RUN_GPU_TESTS=0 skips the tests.
# Usage: bash bench/run_device.sh "tiny_olmo3:--pairs 64 --warmup-steps 1 --steps 1" "gpt_neox_1.4b"
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
# The device tool brings back only a few files: everything is written to a work folder and comes back as one
# archive, $OUT/bench.tgz (also when a phase fails).
DEST=$OUT
OUT=$(mktemp -d)
trap 'tar czf "$DEST/bench.tgz" -C "$OUT" .' EXIT
mkdir -p "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_MININTERVAL=10
# The carried transformers: the image's may be below the floor this repo supports (sfm_dpo/versions.py).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/extra/*.whl || exit 1
python3 -c "import trl.trainer.dpo_trainer, sfm_dpo.fast_trainer" || exit 1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 - <<'PY'
import inspect, torch, transformers, accelerate, trl, datasets
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__, "trl", trl.__version__, "datasets", datasets.__version__)
from torch.nn.attention.varlen import varlen_attn
print("varlen_attn", inspect.signature(varlen_attn))
PY
} 2>&1 | tee "$OUT/env.txt"
if [ "${RUN_GPU_TESTS:-1}" = 1 ]; then
  timeout "${GPU_TEST_TIMEOUT:-300}" python3 -m pytest -q --run-gpu -m gpu -p no:cacheprovider tests/test_attention_backends.py tests/test_prompt_sharing.py 2>&1 | tail -15 | tee -a "$OUT/env.txt"
fi
bench() {  # bench GROUP INDEX [GPU]
  local arch=${1%%:*} extra="" log="$OUT/log_$2_${1%%:*}.txt"
  [ "$1" != "$arch" ] && extra=${1#*:}
  # One GPU per group when given (PARALLEL=1); otherwise the machine's own GPUs (an empty CUDA_VISIBLE_DEVICES
  # would hide them all).
  # shellcheck disable=SC2086
  env ${3:+CUDA_VISIBLE_DEVICES=$3} timeout "${BENCH_TIMEOUT:-480}" \
    python3 bench/bench_dpo.py --arch "$arch" $extra --out "$OUT/results" >"$log" 2>&1
}
status=0 i=0 pids=()
for group in "$@"; do
  if [ "${PARALLEL:-0}" = 1 ]; then  # one group per GPU, all at once
    bench "$group" "$i" "$i" &
    pids+=($!)
  else
    bench "$group" "$i" || status=1
  fi
  i=$((i + 1))
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for log in "$OUT"/log_*.txt; do
  echo "== $log"
  grep -v "Reference log-probs:" "$log" | tail -12
done
exit $status
