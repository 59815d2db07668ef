#!/usr/bin/env bash
# Stops the single-node Slurm cluster started by start_cluster.sh (slurmd, slurmctld,
# munged), using the daemons' pid files. Running jobs are killed with the daemons.
set -euo pipefail

log() { echo "[stop_cluster] $*"; }

[ "$(id -u)" = "0" ] || { echo "[stop_cluster] ERROR: must run as root" >&2; exit 1; }

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stop_by_pidfile /run/slurmd.pid slurmd
stop_by_pidfile /run/slurmctld.pid slurmctld
if [ "${1:-}" = "--keep-munge" ]; then
    log "leaving munged running"
else
    stop_by_pidfile /run/munge/munged.pid munged
fi
log "done"
