#!/bin/bash
# Install the Debian packages of the local test Slurm cluster (idempotent; needs root and apt).
#
#   bash slurm/cluster/install.sh
#
# Slurm 22.05 on Debian 12: controller, node daemon, client commands, munge authentication, and
# accounting (slurmdbd + a private MariaDB) so that `sacct` -- which submitit polls for job states --
# works as on a real cluster. About 20 s on a fresh machine; nothing is started or enabled here.
set -euo pipefail

packages=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm/cluster/install.sh: all packages present (${packages[*]})"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "slurm/cluster/install.sh: need root to install ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale on a fresh machine: update only when a plain install fails.
if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
echo "slurm/cluster/install.sh: installed ${missing[*]}"
