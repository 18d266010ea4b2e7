#!/usr/bin/env bash
# Installs the Slurm daemons and clients the test suite runs its clusters with (tests/slurm_cluster.py, one node;
# tests/multinode_cluster.py, two nodes in network namespaces: iproute2's ip, util-linux's nsenter and unshare).
# Idempotent: does nothing when they are already there. Debian/Ubuntu, as root. Slurm 22.05 on Debian 12.
set -euo pipefail

slurm_version() { dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "version unknown"; }

# Every tool the tests call (tests/slurm_cluster.py DAEMONS, and the namespaces of the 2-node cluster).
needed=(munged mungekey slurmctld slurmd sbatch salloc srun scontrol squeue scancel sinfo ip nsenter unshare)
find_missing() {
    missing=()
    for tool in "${needed[@]}"; do
        command -v "$tool" >/dev/null 2>&1 || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
    done
}
find_missing
if ((${#missing[@]} == 0)); then
    echo "install_slurm: Slurm and munge already installed ($(slurm_version))"
    exit 0
fi
[[ $(id -u) == 0 ]] || { echo "install_slurm: missing ${missing[*]}; run as root to install them" >&2; exit 1; }
command -v apt-get >/dev/null || { echo "install_slurm: missing ${missing[*]} and no apt-get" >&2; exit 1; }
echo "install_slurm: installing munge, Slurm and iproute2 (missing: ${missing[*]})"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The image's policy-rc.d keeps the package scripts from starting the services; the tests start their own.
apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client iproute2 util-linux >/dev/null
find_missing
if ((${#missing[@]})); then
    echo "install_slurm: ERROR: still missing after the install: ${missing[*]} (Slurm $(slurm_version))" >&2
    exit 1
fi
echo "install_slurm: Slurm $(slurm_version) installed"
