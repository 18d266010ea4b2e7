#!/usr/bin/env bash
# The ONE launcher: both sbatch wrappers and `make demo` call it. Runs train_dpo.py with configs/RECIPE.yaml on
# whatever it finds: a Slurm allocation of N nodes (one `accelerate launch` per node through srun), the local GPUs,
# or, with no GPU, 2 CPU processes (the embedded demo; DeepSpeed ZeRO-2 stays on).
#
#   bash scripts/launch.sh RECIPE [train_dpo.py args...]        # e.g. bash scripts/launch.sh demo --max_steps 4
#   sbatch scripts/dpo_train.sh [train_dpo.py args...]           # the wrappers exec this with RECIPE think/instruct
#   bash scripts/launch.sh --dry-run RECIPE [args...]            # or LAUNCH_DRY_RUN=1: print the commands, run nothing
#
# Environment (all optional; .env, then the site profile, may set them): SITE_PROFILE (scripts/sites/NAME.sh or a
# path; default "default"), VENV (virtualenv to activate; default .venv; "none" to keep the current environment),
# GPUS_PER_NODE (override the GPU count), CPU_PROCESSES (processes of the CPU fallback, default 2), MASTER_PORT,
# OUTPUT_ROOT (a big filesystem: outputs/ becomes a link to it), SFM_CUDA_DEVICES (skip probing, trust this count),
# PREEMPT_RESEND_S (how often a pending SIGUSR1 is re-sent to workers that may not handle it yet; default 30).
#
# Preemption: Slurm sends SIGUSR1 to this shell (`--signal=B:USR1@300`, `scancel --signal=USR1 --batch`). We forward
# it through srun to `launch.sh --node-task` on every node, which sends it to the training processes (the children
# of `accelerate launch`; the launcher itself ignores it, since by default it would die of it). Training saves a
# complete checkpoint and rank 0 writes $SFM_REQUEUE_MARKER (sfm_dpo/preemption.py); seeing that file we run
# `scontrol requeue` and exit 0. The requeued job runs the same command, so train_dpo.py resumes in the same output_dir.
set -euo pipefail

# The whole script is one { ... } block, parsed before it runs: a job runs for hours, and bash reads a plain script
# as it goes, so a `git pull` meanwhile would feed it the new file at the old offset (seen: a syntax error in place of
# the requeue).
{

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUEUE_EXIT_CODE=75 # sfm_dpo.preemption.REQUEUE_EXIT_CODE: a local run that stopped for preemption
DRY_RUN=${LAUNCH_DRY_RUN:-0}

log() { echo "[launch $(date +%H:%M:%S)] $*"; }
die() {
    echo "[launch] ERROR: $*" >&2
    exit 1
}

# ---- Per-node supervisor: `launch.sh --node-task CMD`, run by srun on each node (or directly, without Slurm). ----
# CMD is a shell-quoted command line; $SLURM_PROCID in it is expanded here, on the node, to the machine rank.
node_task() {
    local cmd=$1
    if [[ "$DRY_RUN" == 1 ]]; then
        eval "set -- $cmd"
        echo "NODE ${SLURM_NODEID:-0} (SLURM_PROCID=${SLURM_PROCID:-unset}): $(printf '%q ' "$@")"
        return 0
    fi
    # The agent (accelerate launch -> torch elastic) must ignore SIGUSR1, which would kill it: whether srun signals
    # the task's process group (proctrack/pgid) or the whole step cgroup, it reaches the agent. Its workers inherit
    # the "ignore" until PreemptionCallback installs a handler, so a pending request is re-sent every 30 s.
    (
        trap '' USR1
        eval "exec $cmd"
    ) &
    local agent=$! pending=0 last_sent=0
    signal_workers() {
        # The workers run in their own sessions (torch elastic's start_new_session), so they are named by parent.
        pkill -USR1 -P "$agent" || true
        last_sent=$SECONDS
    }
    trap 'pending=1; signal_workers' USR1
    while kill -0 "$agent" 2>/dev/null; do
        sleep 2 &
        wait $! || true
        if ((pending)) && ((SECONDS - last_sent >= ${PREEMPT_RESEND_S:-30})); then signal_workers; fi
    done
    local rc=0
    wait "$agent" || rc=$?
    return "$rc"
}

if [[ "${1:-}" == "--node-task" ]]; then
    [[ $# -eq 2 ]] || die "usage: launch.sh --node-task 'COMMAND'"
    node_task "$2"
    exit $?
fi

# ---- Batch level ----
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
recipes=$(cd "$REPO/configs" && for f in *.yaml; do printf '%s ' "${f%.yaml}"; done)
[[ $# -ge 1 ]] || die "usage: launch.sh [--dry-run] RECIPE [train_dpo.py args...]  (RECIPE: $recipes)"
RECIPE=$1
shift
[[ -f "$REPO/configs/$RECIPE.yaml" ]] || die "no recipe configs/$RECIPE.yaml (have: $recipes)"
cd "$REPO"

if [[ -f .env ]]; then
    # Secrets stay in the environment; never echo them.
    set -a
    # shellcheck disable=SC1091
    source .env
    set +a
    log "loaded .env"
fi

SITE_PROFILE=${SITE_PROFILE:-default}
site_file=$SITE_PROFILE
[[ "$site_file" == */* ]] || site_file="scripts/sites/$SITE_PROFILE.sh"
[[ -f "$site_file" ]] || die "site profile $site_file not found (SITE_PROFILE=$SITE_PROFILE; see scripts/sites/)"
# shellcheck disable=SC1090
source "$site_file"

VENV=${VENV:-$REPO/.venv}
if [[ "$VENV" != none ]]; then
    [[ -f "$VENV/bin/activate" ]] || die "no virtualenv at $VENV (run 'make demo' or set VENV=/path or VENV=none)"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
# Python and package versions first (sfm_dpo/versions.py: one line with the fix, exit 3), before torch is imported.
python -m sfm_dpo.versions
command -v accelerate >/dev/null || die "accelerate not found in $(command -v python || echo 'no python')"

mkdir -p logs
if [[ -n "${OUTPUT_ROOT:-}" ]]; then
    mkdir -p "$OUTPUT_ROOT"
    if [[ ! -e outputs ]]; then
        ln -s "$OUTPUT_ROOT" outputs
    elif [[ "$(readlink -f outputs)" != "$(readlink -f "$OUTPUT_ROOT")" ]]; then
        die "outputs/ exists and is not a link to OUTPUT_ROOT=$OUTPUT_ROOT; move it there or unset OUTPUT_ROOT"
    fi
fi

# ---- The world ----
# Real GPUs are counted by torch (CUDA_VISIBLE_DEVICES respected), never inferred from Slurm's GRES alone: a node
# whose GPUs Slurm lists but the driver doesn't see (or a test cluster's fake ones) takes the CPU path, loudly.
if [[ -n "${SFM_CUDA_DEVICES:-}" ]]; then
    cuda_devices=$SFM_CUDA_DEVICES
elif command -v nvidia-smi >/dev/null 2>&1; then
    cuda_devices=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
else
    cuda_devices=0
fi

if [[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
    UNDER_SLURM=1
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    slurm_gpus=${SLURM_GPUS_ON_NODE:-}
    if [[ -z "$slurm_gpus" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        slurm_gpus=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
    fi
else
    UNDER_SLURM=0
    NNODES=1
    MASTER_ADDR=127.0.0.1
    slurm_gpus=
fi

if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    PROCS_PER_NODE=$GPUS_PER_NODE
    DEVICE="GPU (GPUS_PER_NODE=$GPUS_PER_NODE)"
elif ((cuda_devices > 0)); then
    PROCS_PER_NODE=${slurm_gpus:-$cuda_devices}
    ((PROCS_PER_NODE <= cuda_devices)) || die "Slurm allotted $PROCS_PER_NODE GPUs per node but torch sees $cuda_devices"
    DEVICE="GPU"
else
    PROCS_PER_NODE=${CPU_PROCESSES:-2}
    DEVICE="CPU"
    log "no usable GPU (torch sees none${slurm_gpus:+; Slurm lists $slurm_gpus, fake or not visible}): falling back to $PROCS_PER_NODE CPU processes per node, DeepSpeed ZeRO-2 over gloo"
fi
NPROCS=$((NNODES * PROCS_PER_NODE))
if [[ -z "${MASTER_PORT:-}" ]]; then
    # A port free on this host, which is the first node of the allocation (where rank 0 and the rendezvous run).
    MASTER_PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
fi

# Python answers questions about the recipe, parsed exactly as train_dpo.py will: the output dir after the per-model
# derivation (--model_name_or_path ORG/NAME -> outputs/dpo/NAME) and whether it runs on the CPU (use_cpu). A bad
# config fails here, before srun.
probe=$(
    python - "$RECIPE" "$@" <<'EOF'
import logging
import sys
import warnings

sys.argv = ["train_dpo.py", "--config", f"configs/{sys.argv[1]}.yaml", *sys.argv[2:]]
import torch  # noqa: E402

import train_dpo  # noqa: E402
from sfm_dpo.config import derive_run_names, make_parser  # noqa: E402

logging.disable(logging.WARNING)
warnings.simplefilter("ignore")  # the header is what we print here; train_dpo.py warns itself
argv = sys.argv[1:]
try:
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    use_cpu = training_args.use_cpu
except ValueError as error:
    # This host has no GPU (a dry run, a CPU batch node) and the recipe wants bf16 on GPUs: parse as on the CPU
    # to get the output dir; the launcher decides whether that is an error.
    if torch.cuda.is_available() or "bf16" not in str(error):
        raise
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv + ["--use_cpu", "true"])
    use_cpu = False
derive_run_names(model_args, training_args, train_dpo.recipe_model(argv), argv, logging.getLogger("launch"))
print(training_args.output_dir)
print(int(use_cpu))
EOF
) || die "configs/$RECIPE.yaml with arguments [$*] does not parse (error above); nothing was launched"
OUTPUT_DIR=$(sed -n 1p <<<"$probe")
if [[ "$DEVICE" == CPU && "$(sed -n 2p <<<"$probe")" != 1 ]]; then
    die "no usable GPU here, and configs/$RECIPE.yaml trains on GPUs (use_cpu false): run on a GPU node, or pass --use_cpu true --bf16 false (as configs/demo.yaml does)"
fi

export SFM_REQUEUE_MARKER="$REPO/logs/.requeue-${SLURM_JOB_ID:-local-$$}"
# Packed micro-batches change shape every step and the reference pass frees its buffers before DeepSpeed allocates
# its own: without expandable segments the 6.86B shape on 2 H100s died asking for 12.8 GiB with 12.8 GiB reserved but
# unallocated (bench/results/20261125-zero2_*).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
rm -f "$SFM_REQUEUE_MARKER" # a requeued job has the same id: only this run's marker counts

train_args=""
(($#)) && train_args=$(printf ' %q' "$@") # with no argument printf would still print ''
if ((UNDER_SLURM)); then
    # c10d rendezvous and DeepSpeed's "standard" multi-node launcher (its default, pdsh, would ssh to the nodes).
    # \$SLURM_PROCID stays literal here: each node's task expands it to its own machine rank.
    CMD="accelerate launch --config_file accelerate_config.yaml --num_machines $NNODES --num_processes $NPROCS"
    CMD+=" --machine_rank \$SLURM_PROCID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT"
    CMD+=" --rdzv_backend c10d --deepspeed_multinode_launcher standard"
    CMD+=" train_dpo.py --config configs/$RECIPE.yaml$train_args"
    RUN=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1)
    # Slurm 22.05+ srun does not inherit --cpus-per-task from the batch allocation: pass it on, or every rank
    # of a node shares one core under task/affinity.
    [[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || RUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    RUN+=(bash "$REPO/scripts/launch.sh" --node-task "$CMD")
else
    CMD="accelerate launch --config_file accelerate_config.yaml --num_machines 1 --num_processes $NPROCS"
    CMD+=" --machine_rank 0 --main_process_port $MASTER_PORT"
    CMD+=" train_dpo.py --config configs/$RECIPE.yaml$train_args"
    RUN=(bash "$REPO/scripts/launch.sh" --node-task "$CMD")
fi

GIT_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || GIT_COMMIT+=" (+ uncommitted changes)"
cat <<EOF
================================================================================
 job        ${SLURM_JOB_ID:-local}${SLURM_RESTART_COUNT:+ (requeued ${SLURM_RESTART_COUNT}x)}  ${SLURM_JOB_NAME:-}
 nodes      $NNODES ${SLURM_JOB_NODELIST:-$(hostname)}  (master $MASTER_ADDR:$MASTER_PORT)
 processes  $NPROCS = $NNODES x $PROCS_PER_NODE  on $DEVICE
 git        $GIT_COMMIT
 recipe     configs/$RECIPE.yaml$train_args
 output_dir $OUTPUT_DIR
 site       $site_file   python $(command -v python)
================================================================================
EOF

if [[ "$DRY_RUN" == 1 ]]; then
    echo "RUN: $(printf '%q ' "${RUN[@]}")"
    if ((UNDER_SLURM)); then
        for ((node = 0; node < NNODES; node++)); do
            SLURM_PROCID=$node SLURM_NODEID=$node node_task "$CMD"
        done
    else
        node_task "$CMD"
    fi
    exit 0
fi

PREEMPTED_AT=
# shellcheck disable=SC2317,SC2329  # invoked by the trap (the code differs between shellcheck versions)
forward_preemption() {
    PREEMPTED_AT=$(date +%H:%M:%S)
    log "SIGUSR1: asking training to save a checkpoint at the next step and stop"
    kill -USR1 "$child" 2>/dev/null || true
}
trap forward_preemption USR1

start=$SECONDS
"${RUN[@]}" &
child=$!
rc=0
while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break # else wait was interrupted by the trap: keep waiting
done
trap - USR1
elapsed=$((SECONDS - start))

steps=$(python -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["global_step"])
except (OSError, ValueError, KeyError):
    print("?")' "$OUTPUT_DIR/trainer_state.json")
summary() {
    cat <<EOF
================================================================================
 $1
 exit code  $rc   wall time ${elapsed}s   ${PREEMPTED_AT:+preemption signal at $PREEMPTED_AT}
 steps      $steps (from $OUTPUT_DIR/trainer_state.json, final save only)
 output_dir $OUTPUT_DIR
================================================================================
EOF
}

if [[ -f "$SFM_REQUEUE_MARKER" ]]; then
    step=$(cat "$SFM_REQUEUE_MARKER")
    rm -f "$SFM_REQUEUE_MARKER"
    if ((UNDER_SLURM)); then
        summary "PREEMPTED: checkpoint at step $step saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    summary "PREEMPTED: checkpoint at step $step saved; run the same command again to resume"
    exit "$REQUEUE_EXIT_CODE"
fi
if ((rc != 0)); then
    summary "FAILED: training exited with $rc (the error is above${SLURM_JOB_ID:+, in logs/${SLURM_JOB_NAME:-}-$SLURM_JOB_ID.out})"
    exit "$rc"
fi
summary "DONE: model saved to $OUTPUT_DIR"
exit 0
}
