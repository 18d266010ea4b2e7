# shellcheck shell=bash
# Site profile sourced by scripts/launch.sh (SITE_PROFILE=default, the default). A plain cluster: the project's own
# .venv, NCCL's defaults, outputs/ inside the repo. Copy example_slingshot.sh for a cluster that needs more.
#
# Variables a profile may set: VENV (a virtualenv, or "none" when the profile activates conda itself), OUTPUT_ROOT
# (outputs/ becomes a link to it), HF_HOME, TORCH_EXTENSIONS_DIR, NCCL_*/FI_* network settings, GPUS_PER_NODE.

# One OpenMP thread per rank unless asked otherwise: torch's default (all cores in every rank) oversubscribes the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
