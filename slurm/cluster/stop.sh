#!/bin/bash
# Stop the local Slurm test cluster started by start.sh: cancel every job, then stop each daemon by
# the pid in DIR/pids, then any process left over from the cluster's jobs.
#
#   bash slurm/cluster/stop.sh [DIR]      # default /tmp/mgn-slurm, as start.sh
#
# `scontrol shutdown` would leave job processes running, hence scancel first. Exits non-zero if a
# daemon survived SIGKILL. The 127.0.0.1 n1 n2 line in /etc/hosts is left in place.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

DIR=$(realpath -m "${1:-${MGN_SLURM_DIR:-/tmp/mgn-slurm}}")
[ -f "$DIR/slurm.conf" ] || { echo "slurm/cluster/stop.sh: no cluster in $DIR"; exit 0; }
export SLURM_CONF="$DIR/slurm.conf"

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" | cut -c1)" != Z ]; }

# Stop pids: SIGTERM, up to 15 s, then SIGKILL. Returns non-zero if any survives.
stop_pids() {
    local pid deadline=$((SECONDS + 15)) status=0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "$@"; do
        while alive "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        if alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null
            sleep 0.5
            alive "$pid" && { echo "slurm/cluster/stop.sh: pid $pid survived SIGKILL" >&2; status=1; }
        fi
    done
    return $status
}

pid_of() { cat "$DIR/pids/$1.pid" 2>/dev/null; }

# 1. Jobs: cancel all, wait (bounded) until the controller has none left running.
ctld=$(pid_of slurmctld)
if alive "$ctld"; then
    jobs=$(timeout 20 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// }" ]; then
        # shellcheck disable=SC2086
        timeout 20 scancel $jobs 2>/dev/null
        deadline=$((SECONDS + 45))
        while [ -n "$(timeout 10 squeue -h -t PD,R,CG,CF,RQ,RS,S -o %i 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
            sleep 0.5
        done
    fi
fi

# 2. Daemons, by pid: nodes first, then the controller, accounting, database, munge.
status=0
for name in slurmd-n1 slurmd-n2 slurmctld slurmdbd mariadbd munged; do
    pid=$(pid_of "$name")
    if alive "$pid"; then
        stop_pids "$pid" || status=1
        echo "slurm/cluster/stop.sh: stopped $name (pid $pid)"
    fi
done

# 3. Leftovers: processes started by the cluster's daemons (marked by start.sh) and processes of its
#    jobs (they carry SLURM_JOB_ID and this cluster's SLURM_CONF).
strays=()
for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}; pid=${pid%/environ}
    [ "$pid" = $$ ] && continue
    env=$(tr '\0' '\n' 2>/dev/null < "$environ") || continue
    if grep -qx "MGN_SLURM_CLUSTER=$DIR" <<< "$env" \
        || { grep -q "^SLURM_JOB_ID=" <<< "$env" && grep -qx "SLURM_CONF=$DIR/slurm.conf" <<< "$env"; }; then
        strays+=("$pid")
    fi
done
if [ ${#strays[@]} -gt 0 ]; then
    echo "slurm/cluster/stop.sh: stopping leftover processes ${strays[*]}"
    stop_pids "${strays[@]}" || status=1
fi
rm -f "$DIR"/pids/*.pid
exit $status
