#!/usr/bin/env bash
# Stops the single-node Slurm cluster started by start_cluster.sh (slurmd, slurmctld,
# munged), using the daemons' pid files. Running jobs are killed with the daemons.
set -euo pipefail

log() { echo "[stop_cluster] $*"; }

[ "$(id -u)" = "0" ] || { echo "[stop_cluster] ERROR: must run as root" >&2; exit 1; }

stop_by_pidfile() {
    local pidfile=$1 name=$2 pid
    if [ ! -f "$pidfile" ]; then
        log "$name: no pid file $pidfile, not running"
        return 0
    fi
    pid=$(cat "$pidfile" 2>/dev/null || true)
    # Only kill the pid if it still is the daemon (pid reuse after a restart).
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null || true)" = "$name" ]; then
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop, sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        fi
    else
        log "$name: stale pid file $pidfile"
    fi
    rm -f "$pidfile"
}

stop_by_pidfile /run/slurmd.pid slurmd
stop_by_pidfile /run/slurmctld.pid slurmctld
if [ "${1:-}" = "--keep-munge" ]; then
    log "leaving munged running"
else
    stop_by_pidfile /run/munge/munged.pid munged
fi
log "done"
