#!/usr/bin/env bash
# The multi-GPU runs on an N-GPU device machine (device tool, carry .whl and .gpucheck): each argument is one phase.
#   zero2:ARCH:MAX_LENGTH[:extra zero2_first_step.py flags]  one `accelerate launch` of N processes under
#       accelerate_config.yaml (DeepSpeed ZeRO-2), bench/zero2_first_step.py; JSON in $OUT/results
#   scaling:ARCH  the fast path under ZeRO-2 on 1 GPU and on N at the same global batch (32 pairs): first-step
#       losses and gradient norms, tokens/s per GPU; bench/zero2_first_step.py --compare writes the comparison
#   usr1   scripts/launch.sh think on all GPUs (the launcher sbatch runs, here without Slurm), SIGUSR1 after the
#       first logged step -> complete checkpoint, exit 75; the same command again resumes and finishes
# Usage: bash bench/run_multi_gpu.sh "zero2:gpt_neox_6.9b:8192:--grad-ckpt --compile-layers" usr1
set -uo pipefail
OUT=${OUT:?set OUT to the folder that comes back}
# The device tool brings back only a few files: everything is written to a work folder and comes back as one
# archive, $OUT/multi_gpu.tgz (also when a phase fails).
DEST=$OUT
OUT=$(mktemp -d)
trap 'tar czf "$DEST/multi_gpu.tgz" -C "$OUT" .' EXIT
N=${N:-$(nvidia-smi -L | wc -l)}
mkdir -p "$OUT/results"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl .whl/extra/*.whl .whl/ds/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_MININTERVAL=30
export NCCL_NVLS_ENABLE=0 VENV=none PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True # as scripts/launch.sh
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/env.txt"

run_zero2() {  # run_zero2 NAME N_PROCESSES [zero2_first_step.py flags]: one accelerate launch; NAME.log, NAME.json
    local name=$1 n=$2
    shift 2
    timeout "${PHASE_TIMEOUT:-300}" python3 -m accelerate.commands.launch --config_file accelerate_config.yaml \
        --num_processes "$n" bench/zero2_first_step.py "$@" --out "$OUT/results/$name.json" >"$OUT/$name.log" 2>&1
    echo "== $name rc=$?"
    grep -E '^\{|OutOfMemory|Error' "$OUT/$name.log" | cut -c1-900 | tail -4
}

zero2() {
    local arch=$1 max_length=$2 extra=$3
    # shellcheck disable=SC2086
    run_zero2 "zero2_${arch}_${max_length}_n${N}$(echo "$extra" | tr -d ' -' | tr -c 'a-zA-Z0-9\n' _)" "$N" \
        --arch "$arch" --max-length "$max_length" --token-budget $((2 * max_length)) --steps 2 --warmup-steps 1 $extra
}

scaling() {
    local arch=$1 n
    for n in 1 "$N"; do
        run_zero2 "zero2_${arch}_n$n" "$n" --arch "$arch"
    done
    python3 bench/zero2_first_step.py --compare "$OUT/results/zero2_${arch}_n1.json" "$OUT/results/zero2_${arch}_n$N.json" \
        --compare-out "$OUT/results/zero2_${arch}_compare.json"
}

usr1() {
    local run=/tmp/usr1_run log="$OUT/usr1_first.log"
    local args=(think --model_name_or_path .gpucheck/tiny-gpt_neox --dataset_name .gpucheck/data/dolci_think.jsonl
        --output_dir "$run" --report_to none --push_to_hub false --max_length 1024 --max_prompt_length 512 --max_tokens_per_microbatch 2048
        --effective_batch_size 16 --max_steps 60 --save_steps 100 --logging_steps 1 --compile_layers false)
    rm -rf "$run"
    bash scripts/launch.sh "${args[@]}" >"$log" 2>&1 &
    local pid=$! waited=0
    # 60 steps of the tiny model take ~20 s on an H100: the signal lands mid-training (6 steps took 1.8 s, and a
    # signal after the first logged step arrived after the end).
    until grep -q "'loss'" "$log" || ! kill -0 "$pid" 2>/dev/null || ((waited > 2400)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    kill -USR1 "$pid"
    wait "$pid"
    echo "== usr1 first run rc=$? (75 = preempted, checkpoint complete)"
    grep -E "PREEMPTED|'loss'|Error" "$log" | cut -c1-300 | tail -4
    bash scripts/launch.sh "${args[@]}" >"$OUT/usr1_resume.log" 2>&1
    echo "== usr1 resumed run rc=$?"
    grep -E "Resum|resum|'loss'|train_runtime|Error" "$OUT/usr1_resume.log" | cut -c1-300 | tail -9
    find "$run" -maxdepth 2 -newer "$log" | sort | tee "$OUT/usr1_output_dir.txt"
}

for phase in "$@"; do
    case $phase in
    zero2:*)
        IFS=: read -r _ arch max_length extra <<<"$phase"
        zero2 "$arch" "$max_length" "${extra:-}"
        ;;
    scaling:*) scaling "${phase#scaling:}" ;;
    usr1) usr1 ;;
    *) echo "unknown phase $phase" ;;
    esac
done
