#!/usr/bin/env bash
# Install what the loopback SLURM cluster needs (Debian/Ubuntu: slurm-wlm, munge).
#
#   scripts/slurm/install_deps.sh          # installs when missing; a no-op when present
#   scripts/slurm/install_deps.sh --check  # exit 0 when installed, 1 when not (installs nothing)
#
# Needs root (apt-get) only when something is missing. Idempotent: safe to call from the test
# fixture and from `make` on every run.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol squeue sinfo munged)

missing() {
    local b
    for b in "${need[@]}"; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || return 0
    done
    return 1
}

if ! missing; then
    echo "slurm-wlm and munge are installed ($(PATH="$PATH:/usr/sbin" slurmd -V 2>/dev/null || echo slurmd))"
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "slurm-wlm/munge missing" >&2
    exit 1
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "install_deps.sh: slurm-wlm and munge are missing and this is not root;" \
         "run: sudo apt-get install -y slurm-wlm munge" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_deps.sh: no apt-get here; install SLURM (slurmctld, slurmd, clients) and munge by hand" >&2
    exit 2
fi

source "$(dirname "$0")/../apt_install.sh"
apt_install_locked slurm slurm-wlm munge
# The packages may start system daemons (on machines with an init system); the loopback cluster runs
# its own private ones, so the system ones are left as the init system set them.
missing && { echo "install_deps.sh: install finished but commands are still missing" >&2; exit 1; }
echo "slurm-wlm and munge installed ($(PATH="$PATH:/usr/sbin" slurmd -V))"
