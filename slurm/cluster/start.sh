#!/bin/bash
# Start a local Slurm test cluster: munge, (MariaDB + slurmdbd), slurmctld and two slurmd nodes.
#
#   bash slurm/cluster/install.sh              # once: the Debian packages
#   bash slurm/cluster/start.sh [DIR]          # DIR: cluster state, logs, configs (default /tmp/mgn-slurm)
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch, srun, squeue, sacct, submitit talk to it
#   bash slurm/cluster/stop.sh [DIR]           # cancel every job, stop every daemon by its pid
#
# Two fake nodes n1, n2 (4 CPUs, gpu:2 each) run on this host with their own slurmd; the names are
# added to /etc/hosts (127.0.0.1) because jobs derive MASTER_ADDR from the node list. Needs root.
# Environment:
#   MGN_SLURM_PORT_BASE  first of five TCP ports (default 16817): slurmctld, slurmdbd, MariaDB, slurmd n1, n2
#   MGN_SLURM_ACCOUNTING 1: slurmdbd + MariaDB, so sacct works (default when installed); 0: none
# Writes DIR/env.sh (source it) and DIR/pids/*.pid; prints the daemons' pids.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$(realpath -m "${1:-${MGN_SLURM_DIR:-/tmp/mgn-slurm}}")
BASE=${MGN_SLURM_PORT_BASE:-16817}
CTLD_PORT=$BASE DBD_PORT=$((BASE + 1)) DB_PORT=$((BASE + 2))
SLURMD_PORT_1=$((BASE + 3)) SLURMD_PORT_2=$((BASE + 4))
HOST=$(hostname -s)

die() { echo "slurm/cluster/start.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (the test nodes run jobs as root)"
for exe in munged slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null || die "$exe not found: run slurm/cluster/install.sh"
done
ACCOUNTING=${MGN_SLURM_ACCOUNTING:-auto}
if [ "$ACCOUNTING" = auto ]; then
    if command -v slurmdbd >/dev/null && command -v mariadbd >/dev/null; then ACCOUNTING=1; else ACCOUNTING=0; fi
fi
[ -e "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null \
    && die "a cluster is already running in $DIR (stop it with slurm/cluster/stop.sh $DIR)"
for port in $CTLD_PORT $DBD_PORT $DB_PORT $SLURMD_PORT_1 $SLURMD_PORT_2; do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null \
        && die "port $port is in use: another cluster running? set MGN_SLURM_PORT_BASE or stop it"
done

# Bounded wait: wait_for SECONDS DESCRIPTION COMMAND...
wait_for() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "timed out after ${seconds}s waiting for $what (logs: $DIR/log)"
        sleep 0.2
    done
}

mkdir -p "$DIR"/{log,pids,state,spool,munge}
render() {  # render TEMPLATE OUTPUT
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" \
        -e "s|@SLURMD_PORT_1@|$SLURMD_PORT_1|g" -e "s|@SLURMD_PORT_2@|$SLURMD_PORT_2|g" "$1" > "$2"
}
render "$HERE/slurm.conf.in" "$DIR/slurm.conf"
render "$HERE/gres.conf.in" "$DIR/gres.conf"
if [ "$ACCOUNTING" = 1 ]; then
    render "$HERE/accounting.conf.in" "$DIR/accounting.conf"
    render "$HERE/slurmdbd.conf.in" "$DIR/slurmdbd.conf"
    chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a readable config
else
    : > "$DIR/accounting.conf"
fi

# Jobs resolve MASTER_ADDR from the node list (n1): make the node names resolvable.
if ! grep -qE "^127\.0\.0\.1[[:space:]].*\bn1 n2\b.*# mgn-slurm-test" /etc/hosts; then
    echo "127.0.0.1 n1 n2  # mgn-slurm-test (slurm/cluster/start.sh)" >> /etc/hosts
fi

# Every daemon gets SLURM_CONF and a marker, so stop.sh can find strays started from them.
export SLURM_CONF="$DIR/slurm.conf" MGN_SLURM_CLUSTER="$DIR"

# munge: a private daemon and socket with the installed key.
install -m 711 -d "$DIR/munge"
install -m 600 /etc/munge/munge.key "$DIR/munge/munge.key"
munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/pids/munged.pid" --seed-file="$DIR/munge/munged.seed" --log-file="$DIR/log/munged.log"
wait_for 10 munged test -S "$DIR/munge/munge.socket"

if [ "$ACCOUNTING" = 1 ]; then
    db=(--no-defaults --socket="$DIR/mysql/mysqld.sock")
    if [ ! -d "$DIR/mysql/data/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$DIR/mysql/data" --user=root \
            --auth-root-authentication-method=normal --skip-test-db > "$DIR/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
    fi
    # mariadbd stays in the foreground: detach it, stdio to its log, so callers' pipes close.
    setsid mariadbd --no-defaults --datadir="$DIR/mysql/data" --user=root --bind-address=127.0.0.1 \
        --port="$DB_PORT" --socket="$DIR/mysql/mysqld.sock" --pid-file="$DIR/pids/mariadbd.pid" \
        --log-error="$DIR/log/mariadb.log" --skip-name-resolve --innodb-buffer-pool-size=32M \
        < /dev/null >> "$DIR/log/mariadb.log" 2>&1 &
    wait_for 30 MariaDB mariadb-admin "${db[@]}" -uroot ping
    mariadb "${db[@]}" -uroot -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    slurmdbd < /dev/null > /dev/null 2>&1  # reads slurmdbd.conf next to $SLURM_CONF
    wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
fi

slurmctld -f "$SLURM_CONF" -i < /dev/null > /dev/null 2>&1
for node in n1 n2; do
    mkdir -p "$DIR/spool/$node"
    slurmd -f "$SLURM_CONF" -N "$node" < /dev/null > /dev/null 2>&1
done
nodes_idle() { [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" = 2 ]; }
wait_for 30 "two idle nodes (sinfo)" nodes_idle
if [ "$ACCOUNTING" = 1 ]; then
    # slurmctld registers the cluster with slurmdbd on its first connection.
    wait_for 30 "cluster registration in slurmdbd" bash -c "sacctmgr -n -P list cluster format=cluster | grep -qx mgntest"
fi

cat > "$DIR/env.sh" <<ENV
# source this file to use the local test cluster
export SLURM_CONF=$DIR/slurm.conf
ENV
echo "slurm/cluster/start.sh: cluster up in $DIR (accounting=$ACCOUNTING)"
for pidfile in "$DIR"/pids/*.pid; do
    echo "  $(basename "$pidfile" .pid) pid $(cat "$pidfile")"
done
echo "export SLURM_CONF=$DIR/slurm.conf"
