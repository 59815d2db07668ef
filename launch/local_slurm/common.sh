# Shared helpers of start_cluster.sh and stop_cluster.sh (sourced, not run). Callers define log().
is_running() {  # pid: exists and is not a zombie
    local state
    state=$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null || true)
    [ -n "$state" ] && [ "$state" != "Z" ]
}

# Pids of running processes named exactly $1 (read from /proc: procps may be missing).
pids_named() {
    local dir
    for dir in /proc/[0-9]*; do
        if [ "$(cat "$dir/comm" 2>/dev/null || true)" = "$1" ] && is_running "${dir#/proc/}"; then
            echo "${dir#/proc/}"
        fi
    done
}

# The pid recorded in a pid file, if that process still is the named daemon (pid files
# survive container restarts and pids get reused).
daemon_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null || true)" = "$2" ] && is_running "$pid"; then
        echo "$pid"
        return 0
    fi
    return 1
}

# Stops a daemon: the pid from its pid file, plus any leftover process with exactly that
# name whose pid file was lost (e.g. a daemon started by hand or by an earlier failed run).
stop_by_pidfile() {
    local pidfile=$1 name=$2 pid pids alive
    pids=$( { daemon_pid "$pidfile" "$name" || true; pids_named "$name"; } | sort -u | tr '\n' ' ')
    if [ -z "${pids// /}" ]; then
        if [ -f "$pidfile" ]; then log "$name: stale pid file $pidfile (not running)"; fi
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid ${pids% })"
    kill $pids 2>/dev/null || true
    alive=$pids
    for _ in $(seq 50); do
        alive=""
        for pid in $pids; do
            if is_running "$pid"; then alive="$alive $pid"; fi
        done
        if [ -z "$alive" ]; then break; fi
        sleep 0.1
    done
    if [ -n "$alive" ]; then
        log "$name did not stop, sending SIGKILL to$alive"
        kill -9 $alive 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
