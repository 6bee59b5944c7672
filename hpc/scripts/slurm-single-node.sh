#!/usr/bin/env bash
# A real one-node Slurm on this machine, for the batch tests and for trying
# `pilot hpc submit` without a cluster.
#
# Installs Slurm and munge from the Debian packages when they are missing,
# writes a one-node configuration (the node oversubscribed 4x so that a
# 4-rank test job fits on 2 cores), makes a munge key when there is none,
# and starts munged, slurmctld and slurmd directly (containers have no
# systemd). Idempotent: when the node already answers `sinfo` as idle, it
# does nothing. Every wait is bounded.
#
# Exit codes: 0 Slurm usable; 2 not root; 3 packages cannot be installed;
# 4 daemons did not come up (see the logs under /var/log/slurm).
#
# Environment: SLURM_SETUP_TIMEOUT (seconds to wait for the node, default 90),
# SLURM_CONF_DIR (default /etc/slurm).
set -u

TIMEOUT="${SLURM_SETUP_TIMEOUT:-90}"
CONF_DIR="${SLURM_CONF_DIR:-/etc/slurm}"
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MARK="# written by panda-hpc-pilot hpc/scripts/slurm-single-node.sh"

say() { echo "slurm-single-node: $*" >&2; }

node_state() {
    # The node's state word(s) as sinfo prints them, "" when sinfo fails.
    timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n 1
}

slurm_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    case "$(node_state)" in
        idle* | mixed* | allocated* | completing*) return 0 ;;
        *) return 1 ;;
    esac
}

if slurm_ready; then
    say "already up: node $(node_state)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    say "not root: cannot install or start Slurm"
    exit 2
fi

# One setup at a time (parallel test runs); the second finds Slurm up.
LOCK=/run/lock/slurm-single-node.lock
[ -d /run/lock ] || LOCK=/tmp/slurm-single-node.lock
exec 9>"$LOCK"
if command -v flock >/dev/null 2>&1 && ! flock -w 900 9; then
    say "another setup holds the lock for 900s"
    exit 4
fi
if slurm_ready; then
    say "already up: node $(node_state)"
    exit 0
fi

# --- packages -----------------------------------------------------------
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
    say "installing slurm-wlm and munge from Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 300 apt-get update -q >/dev/null; then
        say "apt-get update failed: no package access"
        exit 3
    fi
    if ! timeout 600 apt-get install -y -q -o Dpkg::Options::=--force-confold \
        slurm-wlm munge >/dev/null; then
        say "apt-get install slurm-wlm munge failed"
        exit 3
    fi
fi

# --- munge --------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    say "creating a munge key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    say "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force || su -s /bin/sh munge -c "/usr/sbin/munged --force"
    for _ in $(seq 1 20); do
        munge_ok && break
        sleep 0.5
    done
    if ! munge_ok; then
        say "munged is not answering"
        exit 4
    fi
fi

# --- configuration --------------------------------------------------------
HOST="$(hostname -s)"
CPUS="$(nproc --all)"
install -d -m 0755 "$CONF_DIR" "$STATE_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" \
    "$LOG_DIR" "$RUN_DIR"

NEW_CONF="$(mktemp)"
cat >"$NEW_CONF" <<EOF
$MARK
ClusterName=pilot
SlurmctldHost=$HOST
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF

CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        cp -p "$CONF" "$CONF.orig.$(date +%s)"
        say "kept the previous $CONF as $CONF.orig.*"
    fi
    install -m 0644 "$NEW_CONF" "$CONF"
    CHANGED=1
fi
rm -f "$NEW_CONF"

# --- daemons ------------------------------------------------------------
pid_alive() {
    # pid_alive FILE NAME: the pid in FILE is a running NAME.
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

stop_daemon() {
    # stop_daemon FILE NAME: TERM the daemon recorded in FILE, wait up to 10 s.
    local pid
    pid_alive "$1" "$2" || return 0
    pid="$(cat "$1")"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 20); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null
}

if [ "$CHANGED" -eq 1 ]; then
    stop_daemon "$RUN_DIR/slurmd.pid" slurmd
    stop_daemon "$RUN_DIR/slurmctld.pid" slurmctld
fi

if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    say "starting slurmctld"
    /usr/sbin/slurmctld || { say "slurmctld failed to start"; exit 4; }
fi
if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    say "starting slurmd"
    /usr/sbin/slurmd || { say "slurmd failed to start"; exit 4; }
fi

# --- wait for the node ----------------------------------------------------
deadline=$(($(date +%s) + TIMEOUT))
delay=0.5
while [ "$(date +%s)" -lt "$deadline" ]; do
    state="$(node_state)"
    case "$state" in
        idle* | mixed* | allocated* | completing*)
            say "up: node $HOST $state"
            exit 0
            ;;
        down* | drain* | fail*)
            timeout 10 scontrol update nodename="$HOST" state=resume >/dev/null 2>&1
            ;;
    esac
    sleep "$delay"
    case "$delay" in
        0.5) delay=1 ;;
        1) delay=2 ;;
    esac
done
say "node $HOST not idle after ${TIMEOUT}s (state: ${state:-none}); see $LOG_DIR"
exit 4
