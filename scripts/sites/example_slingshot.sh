# shellcheck shell=bash
# Example site profile for an HPE Cray EX cluster with a Slingshot network and GH200 (aarch64) nodes, e.g. CSCS Alps.
# Select it in .env with SITE_PROFILE=example_slingshot, then adapt the module names, paths and account to your site.
# Nothing here is x86-specific; flash-attn stays optional (not built for aarch64 on these nodes).

# Modules and a conda environment instead of the repo's .venv.
if command -v module >/dev/null 2>&1; then
    module load cray-python 2>/dev/null || true
fi
if [[ -n "${CONDA_ENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "$(conda info --base)/etc/profile.d/conda.sh"
    conda activate "$CONDA_ENV"
    export VENV=none # read by launch.sh: keep the conda environment
fi

# NCCL over Slingshot goes through libfabric: the aws-ofi-nccl plugin must be on LD_LIBRARY_PATH (a module, or
# your site's container hook). These are the settings HPE and CSCS document for it.
export NCCL_NET="AWS Libfabric"
export FI_PROVIDER=cxi
export NCCL_NET_GDR_LEVEL=PHB
export NCCL_CROSS_NIC=1
export FI_CXI_DISABLE_HOST_REGISTER=1
export FI_MR_CACHE_MONITOR=userfaultfd
export FI_CXI_DEFAULT_CQ_SIZE=131072
export FI_CXI_DEFAULT_TX_SIZE=32768
export FI_CXI_RX_MATCH_MODE=software
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

# Checkpoints of a 7B run are about 100 GB each: keep them, and the caches, on scratch.
if [[ -n "${SCRATCH:-}" ]]; then
    export OUTPUT_ROOT=${OUTPUT_ROOT:-$SCRATCH/sfm-post-training/outputs}
    export HF_HOME=${HF_HOME:-$SCRATCH/hf_home}
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$SCRATCH/torch_extensions}
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
