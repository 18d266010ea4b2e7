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
# PREEMPT_RESEND_S (how often a pending SIGUSR1 is offered again to workers that had no handler yet; default 5),
# SFM_REQUEUE_BACKOFF_S (the waits between tries of a failing `scontrol requeue`; default "5 10 20 40").
#
# .env is read with python-dotenv's rules (sfm_dpo/launcher.py), as train_dpo.py reads it: it never overrides a
# variable already set, and no value is printed. A token on the command line (--hub_token) is refused: HF_TOKEN
# belongs in .env.
#
# Preemption: Slurm sends SIGUSR1 to this shell (`--signal=B:USR1@300`, `scancel --signal=USR1 --batch`). We forward
# it through srun to `launch.sh --node-task` on every node, which sends it to the training processes (the children
# of `accelerate launch`; the launcher itself ignores it, since by default it would die of it). Training saves a
# complete checkpoint and rank 0 writes $SFM_REQUEUE_MARKER (sfm_dpo/preemption.py); seeing that file we run
# `scontrol requeue` (retried) and exit 0. The requeued job runs the same command, so train_dpo.py resumes in the same
# output_dir. A signal during our start-up ends in a requeue without starting training. An interactive allocation
# (salloc, srun) is never requeued: it exits 75 like a local run ("run the same command again").
# The summary at the end says DONE only if training exited 0 AND wrote <output_dir>/run_status.json saying "done".

# First act, for the batch shell and the node task alike: note a SIGUSR1 (by default it would kill us). The handlers
# that act on it come later; the wrappers pass on one they got before exec'ing us as SFM_PREEMPT_PENDING=1.
PREEMPT_PENDING=${SFM_PREEMPT_PENDING:-0}
trap 'PREEMPT_PENDING=1' USR1
unset SFM_PREEMPT_PENDING
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
    # the "ignore" until PreemptionCallback installs a handler. So each worker gets the signal once, when it has a
    # handler (its SigCgt in /proc): a pending request is offered again every PREEMPT_RESEND_S to those that had
    # none yet (a signal before the agent started counts: the start-up trap noted it). Never to a worker without a
    # handler: Python resets its handlers to the default when the interpreter exits, and the default kills.
    # Our handler is in place before the agent starts; the agent's subshell then writes our "ready" file for the
    # batch level, which forwards a signal to us only once every node's file exists: srun, and this script, die of a
    # SIGUSR1 that comes before their handlers.
    local agent='' pending=$PREEMPT_PENDING last_sent=-1000000 signalled=' '
    local usr1_bit=$((1 << ($(kill -l USR1) - 1)))
    signal_workers() {
        local pid caught
        last_sent=$SECONDS
        [[ -n "$agent" ]] || return 0
        # The workers run in their own sessions (torch elastic's start_new_session), so they are named by parent.
        for pid in $(pgrep -P "$agent"); do
            [[ "$signalled" != *" $pid "* ]] || continue
            caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || continue
            if ((0x${caught:-0} & usr1_bit)) && kill -USR1 "$pid" 2>/dev/null; then signalled+="$pid "; fi
        done
    }
    # shellcheck disable=SC2317,SC2329  # invoked by the trap
    on_node_usr1() {
        ((pending)) && return # already passing it on: one request, one save
        pending=1
        signal_workers
    }
    trap on_node_usr1 USR1
    (
        trap '' USR1
        [[ -z "${SFM_REQUEUE_MARKER:-}" ]] || touch "$SFM_REQUEUE_MARKER.ready-${SLURM_NODEID:-0}"
        eval "exec $cmd"
    ) &
    agent=$!
    # A short poll: the node task (and so the job) ends within a quarter second of the agent; a signal wakes the
    # wait at once whatever the period.
    while kill -0 "$agent" 2>/dev/null; do
        sleep 0.25 &
        wait $! || true
        if ((pending)) && ((SECONDS - last_sent >= ${PREEMPT_RESEND_S:-5})); then signal_workers; fi
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
# A token on the command line is in every process listing of the node, in Slurm's job record, and would be in our
# header and errors: refuse it before anything prints the arguments, without printing it.
for arg in "$@"; do
    what=
    [[ "$arg" =~ ^--hub[_-]token(=|$) ]] && what="--hub_token"
    [[ "$arg" =~ (^|=)hf_[A-Za-z0-9]{30,}$ ]] && what="an argument that looks like a Hub token, hf_..."
    if [[ -n "$what" ]]; then
        echo "[launch] ERROR: a Hub token was given on the command line ($what), where every user of" \
            "the node can read it (ps) and Slurm keeps it in the job record. Nothing was launched. Put it in .env" \
            "instead (HF_TOKEN=..., then chmod 600 .env; see .env.example), submit again without it, and consider" \
            "this token exposed: replace it at https://huggingface.co/settings/tokens." >&2
        exit 2
    fi
done

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

# .env may name VENV itself, so it is read before any virtualenv is active: by the first python that has
# python-dotenv among VENV's (from the environment), the repo's .venv, and the one on PATH.
dotenv_python() {
    local py
    for py in ${VENV:+"$VENV/bin/python"} "$REPO/.venv/bin/python" python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import dotenv' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}
if [[ -f .env ]]; then
    dotenv_py=$(dotenv_python) ||
        die "cannot read .env: no python with python-dotenv (tried ${VENV:+$VENV/bin/python, }$REPO/.venv/bin/python, python3, python on PATH); set VENV=/path/to/your/virtualenv or pip install python-dotenv"
    DOTENV_SET='' DOTENV_KEPT=''
    # Prints `export KEY='value'` for the keys not set yet (shell-quoted, so eval runs no value) and the two lists.
    # Our shell's variables count as set: a .env line IFS=... or REPO=... must not change how this script runs.
    # shellcheck disable=SC2046  # one name per word
    dotenv_exports=$("$dotenv_py" -m sfm_dpo.launcher dotenv .env $(compgen -v)) ||
        die "could not read .env (error above)"
    eval "$dotenv_exports"
    unset dotenv_exports
    log "loaded .env (values not shown): set ${DOTENV_SET:-nothing}${DOTENV_KEPT:+; kept from the environment: $DOTENV_KEPT}"
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
from sfm_dpo.versions import require_supported  # noqa: E402

require_supported()  # train_dpo.py's first check: an unsupported Python or package is one line, before srun
import torch  # noqa: E402

# The parser alone, not train_dpo (its trainer, data and Hub imports took 2-4 s of every launch here).
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
derive_run_names(training_args, argv, logging.getLogger("launch"))
print(training_args.output_dir)
print(int(use_cpu))
EOF
) || die "configs/$RECIPE.yaml with arguments [$*] does not parse (error above); nothing was launched"
OUTPUT_DIR=$(sed -n 1p <<<"$probe")
if [[ "$DEVICE" == CPU && "$(sed -n 2p <<<"$probe")" != 1 ]]; then
    die "no usable GPU here, and configs/$RECIPE.yaml trains on GPUs (use_cpu false): run on a GPU node, or pass --use_cpu true --bf16 false (as configs/demo.yaml does)"
fi

# What a preemption ends in. Only a batch job can be requeued: an interactive allocation (salloc, or srun outside
# one) has no batch script for Slurm to run again, so it exits like a local run.
REQUEUE=0
ON_PREEMPTION="checkpoint, then exit $REQUEUE_EXIT_CODE (not under Slurm): run the same command again"
slurm_requeue_mode() {
    local info
    if ! info=$(scontrol show job -o "$SLURM_JOB_ID" 2>&1); then
        # slurmctld unreachable: sbatch's batch step sets ENVIRONMENT=BATCH; salloc and srun do not.
        log "WARNING: scontrol show job $SLURM_JOB_ID failed (${info//$'\n'/ }); deciding by ENVIRONMENT=${ENVIRONMENT:-unset}"
        info="BatchFlag=$([[ "${ENVIRONMENT:-}" == BATCH ]] && echo 1 || echo 0)"
    fi
    case " $info " in
        *" BatchFlag=0 "*)
            ON_PREEMPTION="checkpoint, then exit $REQUEUE_EXIT_CODE: an interactive allocation (salloc/srun, BatchFlag=0) is never requeued; run the same command again"
            ;;
        *" Requeue=0 "*)
            ON_PREEMPTION="checkpoint, then exit $REQUEUE_EXIT_CODE: Slurm may not requeue this job (Requeue=0: --no-requeue, or JobRequeue=0 on this cluster); submit it again"
            ;;
        *)
            REQUEUE=1
            ON_PREEMPTION="checkpoint, then scontrol requeue $SLURM_JOB_ID (a batch job)"
            ;;
    esac
}
if ((UNDER_SLURM)); then
    if [[ "$DRY_RUN" == 1 ]]; then
        ON_PREEMPTION="(a dry run does not ask Slurm whether job $SLURM_JOB_ID is a batch job)"
    else
        slurm_requeue_mode
    fi
fi

export SFM_REQUEUE_MARKER="$REPO/logs/.requeue-${SLURM_JOB_ID:-local-$$}"
# Packed micro-batches change shape every step and the reference pass frees its buffers before DeepSpeed allocates
# its own: without expandable segments the 6.86B shape on 2 H100s died asking for 12.8 GiB with 12.8 GiB reserved but
# unallocated (bench/results/20261125-zero2_*).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# A requeued job has the same id: only this run's marker and node "ready" files count.
rm -f "$SFM_REQUEUE_MARKER" "$SFM_REQUEUE_MARKER".ready-*

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
 on USR1    $ON_PREEMPTION
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

rc=- elapsed=0 steps=- PREEMPTED_AT=
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

# `scontrol requeue`, retried: slurmctld times out under load, and a job that is not requeued is lost. A try that
# timed out may still have requeued the job, so each retry first looks at the job's restart count.
requeue_job() {
    local waits
    read -r -a waits <<<"${SFM_REQUEUE_BACKOFF_S:-5 10 20 40}"
    local tries=$((${#waits[@]} + 1)) try error restarts
    for ((try = 1; try <= tries; try++)); do
        # Logged before: once the requeue is done, Slurm may end this shell before it says so.
        ((try == 1)) || log "scontrol requeue $SLURM_JOB_ID: try $try of $tries"
        if error=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
            log "scontrol requeue $SLURM_JOB_ID: done (try $try of $tries)"
            return 0
        fi
        log "WARNING: scontrol requeue $SLURM_JOB_ID failed (try $try of $tries): ${error//$'\n'/ }"
        ((try < tries)) || break
        sleep "${waits[try - 1]}"
        restarts=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2) || true
        if [[ -n "$restarts" ]] && ((restarts > ${SLURM_RESTART_COUNT:-0})); then
            log "job $SLURM_JOB_ID was requeued after all (Restarts=$restarts)"
            return 0
        fi
    done
    return 1
}

# A preemption: requeue (a batch job) or exit 75 (local, interactive); nothing is lost either way. $1 says what is saved.
end_preempted() {
    if ((REQUEUE)); then
        summary "PREEMPTED: $1; requeueing job $SLURM_JOB_ID"
        requeue_job && exit 0
        echo "[launch] ERROR: job $SLURM_JOB_ID was preempted but could NOT be requeued (scontrol requeue failed" \
            "every time, errors above). Nothing is lost ($1): submit the same command again to resume in" \
            "$OUTPUT_DIR." >&2
        exit "$REQUEUE_EXIT_CODE"
    fi
    summary "PREEMPTED: $1; run the same command again to resume (exit $REQUEUE_EXIT_CODE)"
    exit "$REQUEUE_EXIT_CODE"
}

# From here one SIGUSR1 is passed on once, when every node task has its handler (their "ready" files): srun, and a
# node task that is still starting, would die of it. More signals change nothing (one request, one save).
child=
forwarded=0 # 1: passed on; -1: waiting for the node tasks
# shellcheck disable=SC2317,SC2329  # invoked by the trap (the code differs between shellcheck versions)
forward_when_ready() {
    [[ -n "$PREEMPTED_AT" && -n "$child" ]] && ((forwarded < 1)) || return 0
    local node
    for ((node = 0; node < NNODES; node++)); do
        if [[ ! -e "$SFM_REQUEUE_MARKER.ready-$node" ]]; then
            ((forwarded < 0)) || log "the node tasks are still starting: passing SIGUSR1 on once they can take it"
            forwarded=-1
            return 0
        fi
    done
    ((forwarded == 0)) || log "node tasks ready: passing SIGUSR1 on"
    kill -USR1 "$child" 2>/dev/null || true
    forwarded=1
}
# shellcheck disable=SC2317,SC2329
on_usr1() {
    if [[ -n "$PREEMPTED_AT" ]]; then
        log "SIGUSR1 again: already asked at $PREEMPTED_AT; not asking twice"
        return
    fi
    PREEMPTED_AT=$(date +%H:%M:%S)
    log "SIGUSR1: asking training to save a checkpoint at the next step and stop"
    forward_when_ready
}
trap on_usr1 USR1
if ((PREEMPT_PENDING)); then
    PREEMPTED_AT="start-up"
    log "SIGUSR1 during start-up: not starting training"
    end_preempted "before training started, nothing to save"
fi

status_file="$OUTPUT_DIR/run_status.json"
status_before=$(python -m sfm_dpo.launcher fingerprint "$status_file")
start=$SECONDS
"${RUN[@]}" &
child=$!
while kill -0 "$child" 2>/dev/null; do
    forward_when_ready
    sleep 0.25 & # as the node task's poll: the launcher ends within a quarter second of training
    wait $! || true
done
rc=0
wait "$child" || rc=$?
# Still trapped: a late SIGUSR1 (during the requeue's retries) must not kill us.
trap 'log "SIGUSR1 after training ended: nothing to pass on"' USR1
elapsed=$((SECONDS - start))
rm -f "$SFM_REQUEUE_MARKER".ready-*

steps=$(python -c 'import json, sys
try:
    print(json.load(open(sys.argv[1]))["global_step"])
except (OSError, ValueError, KeyError):
    print("?")' "$OUTPUT_DIR/trainer_state.json")

if [[ -f "$SFM_REQUEUE_MARKER" ]]; then
    saved=$(head -c 300 "$SFM_REQUEUE_MARKER")
    rm -f "$SFM_REQUEUE_MARKER"
    # rank 0 writes the step of the checkpoint, or why nothing needed saving (sfm_dpo/preemption.py)
    [[ "$saved" =~ ^[0-9]+$ ]] && saved="checkpoint at step $saved saved"
    end_preempted "$saved"
fi
# The verdict comes from run_status.json (see sfm_dpo/launcher.py), never from the exit code alone.
outcome=$(python -m sfm_dpo.launcher outcome "$OUTPUT_DIR" "$rc" "$status_before") ||
    outcome=$'failed\nFAILED: could not read the run status (error above)'
verdict=$(sed -n 1p <<<"$outcome")
line=$(sed -n 2p <<<"$outcome")
case $verdict in
    done)
        summary "$line"
        exit 0
        ;;
    preempted) end_preempted "${line#PREEMPTED }" ;;
esac
summary "$line (the error is above${SLURM_JOB_ID:+, in logs/${SLURM_JOB_NAME:-}-$SLURM_JOB_ID.out})"
((rc != 0)) || rc=1
exit "$rc"
}
