#!/bin/bash
# DPO of an SFM model on Dolci-Instruct (configs/instruct.yaml), one node of 4 GPUs by default. From the repo root:
#   mkdir -p logs && sbatch scripts/dpo_instruct_train.sh [train_dpo.py args...]      # Slurm won't create logs/ itself
#   sbatch --nodes=2 scripts/dpo_instruct_train.sh --model_name_or_path ORG/NAME      # -> <output_dir>/NAME, hub ORG/NAME-DPO
#   bash scripts/dpo_instruct_train.sh --max_steps 10                                 # no Slurm: the local GPUs
# Five minutes before the time limit Slurm sends SIGUSR1: training checkpoints, the job requeues and resumes
# (same job id, same log: --open-mode=append keeps the earlier lives' output).
#SBATCH --job-name=instruct
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
# Slurm's SIGUSR1 may come even now: note it for launch.sh, which acts on it (exec resets a trapped signal to its
# default action; do not ignore it here instead: bash cannot trap a signal that was ignored when it started).
trap 'export SFM_PREEMPT_PENDING=1' USR1
set -euo pipefail
# Slurm runs a copy of this file from its spool folder: find the repo through the submit directory.
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f "$REPO/scripts/launch.sh" ]] || { echo "submit from the repo root (no scripts/launch.sh in $REPO)" >&2; exit 1; }
# exec: launch.sh must be the batch shell itself, the process that Slurm's SIGUSR1 reaches.
exec bash "$REPO/scripts/launch.sh" instruct "$@"
