#!/usr/bin/env bash
# Starts a real single-node Slurm cluster (munged + slurmctld + slurmd) on this machine,
# so that the Slurm launcher is tested against real daemons rather than mocks.
#
# Idempotent: when the daemons already run with the current config and the node is
# idle, it only reports that. Stale daemons (from a previous config or a dead container)
# and stale controller state are cleaned up so that rerunning always works.
# Must run as root on Debian (installs slurm-wlm and munge with apt when missing).
#
# Environment overrides:
#   SLURM_LOCAL_MEM_MARGIN_MB  memory kept out of the node's RealMemory (default 1024)
#   SLURM_LOCAL_WAIT_S         how long to wait for the node to become idle (default 60)
#   SLURM_LOCAL_CRED_EXPIRE_S  job credential lifetime = how long a requeued job waits
#                              before it may start again (default 10; Slurm's is 120)
set -euo pipefail

log() { echo "[start_cluster] $*"; }
die() { echo "[start_cluster] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = "0" ] || die "must run as root (it installs packages and starts system daemons)"

SLURM_CONF=/etc/slurm/slurm.conf
STATE_DIR=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
MEM_MARGIN_MB=${SLURM_LOCAL_MEM_MARGIN_MB:-1024}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
CRED_EXPIRE_S=${SLURM_LOCAL_CRED_EXPIRE_S:-10}

# ---------------------------------------------------------------- packages
missing=()
for bin in slurmctld slurmd sinfo sbatch scontrol munged munge unmunge; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "missing commands: ${missing[*]} -> installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Without systemd as PID 1 the packages' service starts fail harmlessly; we start
    # the daemons ourselves below.
    apt-get install -y -q slurm-wlm munge
else
    log "slurm-wlm and munge already installed"
fi

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# ---------------------------------------------------------------- munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s "$MUNGE_KEY" ] || [ "$(stat -c %s "$MUNGE_KEY")" != "1024" ]; then
    log "creating munge key $MUNGE_KEY (1024 random bytes)"
    tmp_key=$(mktemp /etc/munge/.munge.key.XXXXXX)
    head -c 1024 /dev/urandom > "$tmp_key"
    chown munge:munge "$tmp_key"
    chmod 0400 "$tmp_key"
    mv -f "$tmp_key" "$MUNGE_KEY"
    stop_by_pidfile "$MUNGE_PID" munged   # a running munged holds the old key
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    stop_by_pidfile "$MUNGE_PID" munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    log "starting munged"
    # --force: start even if a stale socket/lock from a dead munged is left behind.
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- slurm.conf
host=$(hostname -s)
cpus=$(nproc)
mem_total_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
real_mem_mb=$(( mem_total_mb - MEM_MARGIN_MB ))
[ "$real_mem_mb" -gt 256 ] || die "MemTotal ${mem_total_mb} MB minus margin ${MEM_MARGIN_MB} MB leaves too little memory"
# Jobs that do not ask for memory get an equal per-CPU share instead of the whole node,
# so that several small jobs can share it (CR_Core_Memory schedules memory).
def_mem_per_cpu=$(( real_mem_mb / cpus ))

install -d -m 0755 /etc/slurm "$LOG_DIR" "$SLURMD_SPOOL"
install -d -m 0700 "$STATE_DIR"
new_conf=$(mktemp /etc/slurm/.slurm.conf.XXXXXX)
cat > "$new_conf" <<EOF
# Written by dinov2_repro launch/local_slurm/start_cluster.sh: a single-node test cluster.
ClusterName=local
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also delays a requeued job's restart (BeginTime = requeue + cred_expire):
# 10 s instead of 120 s keeps preemption tests short on this one-machine cluster.
AuthInfo=cred_expire=${CRED_EXPIRE_S}
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
# A requeued job becomes eligible once its BeginTime passes, and only a scheduling pass
# starts it: run the main and backfill passes every 5 s (defaults: 60 s and 30 s).
SchedulerParameters=bf_interval=5,sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${def_mem_per_cpu}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
# Short grace between SIGTERM and SIGKILL when a job is cancelled or requeued: submitit
# jobs ignore SIGTERM, so the default 30 s would only slow preemption tests down.
KillWait=5
NodeName=${host} CPUs=${cpus} RealMemory=${real_mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
chmod 0644 "$new_conf"

conf_changed=1
if [ -f "$SLURM_CONF" ] && cmp -s "$new_conf" "$SLURM_CONF"; then
    conf_changed=0
    rm -f "$new_conf"
else
    log "writing $SLURM_CONF (host=${host} CPUs=${cpus} RealMemory=${real_mem_mb} MB)"
    mv -f "$new_conf" "$SLURM_CONF"
fi

node_state() { sinfo -h -n "$host" -o '%T' 2>/dev/null | head -n1 || true; }

# ---------------------------------------------------------------- fast path
if [ "$conf_changed" = 0 ] && daemon_pid "$CTLD_PID" slurmctld >/dev/null \
        && daemon_pid "$SLURMD_PID" slurmd >/dev/null; then
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing)
            log "cluster already up: node ${host} is ${state}"
            exit 0 ;;
    esac
    log "daemons run but node state is '${state:-unknown}': restarting them"
fi

# ---------------------------------------------------------------- (re)start daemons
stop_by_pidfile "$SLURMD_PID" slurmd
stop_by_pidfile "$CTLD_PID" slurmctld
# Old controller state may reference another host name or node layout and make the new
# controller refuse to start or keep the node down; this is a throwaway test cluster.
log "cleaning StateSaveLocation ${STATE_DIR} and ${SLURMD_SPOOL}"
find "$STATE_DIR" "$SLURMD_SPOOL" -mindepth 1 -delete

log "starting slurmctld"
slurmctld || die "slurmctld failed to start; last log lines:
$(tail -n 30 "$LOG_DIR/slurmctld.log" 2>/dev/null)"
for _ in $(seq 100); do
    scontrol ping 2>/dev/null | grep -q UP && break
    sleep 0.1
done
log "starting slurmd"
slurmd || die "slurmd failed to start; last log lines:
$(tail -n 30 "$LOG_DIR/slurmd.log" 2>/dev/null)"

log "waiting up to ${WAIT_S}s for node ${host} to become idle"
deadline=$(( $(date +%s) + WAIT_S ))
while :; do
    state=$(node_state)
    [ "$state" = "idle" ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "[start_cluster] ERROR: node ${host} is '${state:-not listed}' after ${WAIT_S}s" >&2
        echo "---- sinfo" >&2; sinfo -N -l >&2 || true
        echo "---- tail ${LOG_DIR}/slurmctld.log" >&2; tail -n 30 "$LOG_DIR/slurmctld.log" >&2 || true
        echo "---- tail ${LOG_DIR}/slurmd.log" >&2; tail -n 30 "$LOG_DIR/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
log "cluster up: $(sinfo -h -o '%P %a %D %T %C' | head -n1) (partition avail nodes state cpus A/I/O/T)"
