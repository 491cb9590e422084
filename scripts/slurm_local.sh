#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the `slurm` tests and for trying the job
# scripts of slurm/ before a real cluster.
#
#   scripts/slurm_local.sh start    # install slurm-wlm + munge if absent, write the config,
#                                   # start munged, slurmctld, slurmd, wait until the node is idle
#   scripts/slurm_local.sh stop     # stop the daemons started by `start` (the config stays)
#   scripts/slurm_local.sh status   # sinfo of the local cluster, exit 1 when it is not up
#   scripts/slurm_local.sh env      # the line to eval for the client commands:
#                                   #   eval "$(scripts/slurm_local.sh env)"; sbatch ...
#
# Everything lives under $AGPO_SLURM_DIR (default /tmp/agpo-slurm): slurm.conf, gres.conf,
# state, spool, logs and pid files. Clients find the cluster through SLURM_CONF, which `env`
# prints. Besides the real node (`localhost`, partition `debug`, the default) the config
# declares sixteen powered-down CLOUD nodes gpu[1-16] with 8 GPUs each (partition `gpu`): they
# never run anything, but let the real controller check a multi-node GPU job's directives with
# `sbatch --test-only` (slurm/agpo_70b.sh).
#
# Needs root (the daemons run as root here; apt-get installs the packages). Idempotent: `start`
# on a running cluster only checks it, `stop` on a stopped one does nothing.
set -euo pipefail

DIR=${AGPO_SLURM_DIR:-/tmp/agpo-slurm}
CTLD_PORT=${AGPO_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${AGPO_SLURM_SLURMD_PORT:-6818}
CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=${AGPO_MUNGE_SOCKET:-/run/munge/munge.socket.2}

die() {
    echo "slurm_local.sh: $*" >&2
    exit 1
}
log() { echo "slurm_local.sh: $*"; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge are not installed and this is not root: run \
'apt-get install -y slurm-wlm munge' as root first"
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get: \
install SLURM (slurmctld, slurmd, sbatch) and munge with this system's package manager"
    log "installing slurm-wlm and munge (apt-get)"
    apt-get update -qq || die "apt-get update failed (see above)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null ||
        die "apt-get install slurm-wlm munge failed (see above)"
}

write_config() {
    mkdir -p "$DIR"/{etc,state,spool,log}
    local cpus mem
    cpus=$(nproc)
    # Declare a little less memory than the machine has: slurmd refuses to register a node
    # whose RealMemory exceeds what it finds.
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster. Do not use in production.
ClusterName=agpo-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s; the
# node must have forgotten the previous start's credentials). Short here for the tests.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in a container: track processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# The main scheduling pass every 2 s and backfill every 2 s (defaults 60 s and 30 s): nothing
# else wakes the scheduler when a requeued job's cred_expire is over, so the second start of
# the preemption tests waited up to a minute for the next pass (63 s of a 10 s wait seen).
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
# Batch jobs are requeued only when they ask (#SBATCH --requeue): the tests check the scripts'.
JobRequeue=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Seconds between SIGTERM and SIGKILL when a job ends or is cancelled.
KillWait=30
InactiveLimit=0
MinJobAge=300
# Powered-down cloud nodes: only for sbatch --test-only of the multi-node GPU job.
GresTypes=gpu
SuspendProgram=/bin/true
ResumeProgram=/bin/true
SuspendTime=INFINITE
# The cloud nodes come first: slurmctld 22.05 stops with "Duplicated NodeHostName" when a
# node range follows NodeName=localhost.
NodeName=gpu[1-16] CPUs=64 RealMemory=1000000 Gres=gpu:8 State=CLOUD
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=gpu[1-16] MaxTime=INFINITE State=UP
EOF
    echo "NodeName=gpu[1-16] Name=gpu Count=8" >"$DIR/etc/gres.conf"
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if [[ -S $MUNGE_SOCKET ]] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        return
    fi
    # munged refuses to start without its socket folder, which a fresh machine lacks.
    local sockdir
    sockdir=$(dirname "$MUNGE_SOCKET")
    mkdir -p "$sockdir" /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge "$sockdir" /var/log/munge /var/lib/munge
    chmod 0755 "$sockdir"
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    log "starting munged"
    su -s /bin/sh munge -c "munged --socket=$MUNGE_SOCKET" ||
        die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged is not answering on $MUNGE_SOCKET (see /var/log/munge/munged.log)"
}

node_state() {
    SLURM_CONF=$CONF sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1
}

start() {
    install_packages
    [[ $(id -u) -eq 0 ]] || die "the local cluster runs its daemons as root: run as root"
    if pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid"; then
        log "already running ($CONF)"
    else
        write_config
        start_munge
        if ! pid_alive "$DIR/slurmctld.pid"; then
            log "starting slurmctld"
            # -i: ignore state it cannot recover (a previous run's jobs); the cluster is
            # throwaway.
            slurmctld -f "$CONF" -i || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
        fi
        if ! pid_alive "$DIR/slurmd.pid"; then
            log "starting slurmd"
            slurmd -f "$CONF" || die "slurmd did not start (see $DIR/log/slurmd.log)"
        fi
    fi
    local state=""
    for _ in $(seq 120); do
        state=$(node_state)
        case $state in
        idle | mixed | allocated) break ;;
        down* | drain* | *fail*)
            # A node left down by a previous run's crash: it is ours, bring it back.
            SLURM_CONF=$CONF scontrol update nodename=localhost state=resume 2>/dev/null || true
            ;;
        esac
        sleep 0.5
    done
    case $state in
    idle | mixed | allocated) ;;
    *) die "the node is '${state:-not registered}' after 60 s (see $DIR/log/slurmctld.log and \
$DIR/log/slurmd.log)" ;;
    esac
    log "up: node localhost $state; use: export SLURM_CONF=$CONF"
}

stop_pid() {
    local name=$1 file=$2
    pid_alive "$file" || return 0
    local pid
    pid=$(cat "$file")
    log "stopping $name ($pid)"
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if pid_alive "$DIR/slurmctld.pid"; then
        # Jobs still running would outlive slurmd as orphans: cancel them first.
        SLURM_CONF=$CONF scancel --quiet --full --partition=debug 2>/dev/null || true
        sleep 1
    fi
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    # munged is left running: it is a system service others may use, and harmless.
}

status() {
    pid_alive "$DIR/slurmctld.pid" && pid_alive "$DIR/slurmd.pid" || {
        echo "slurm_local.sh: not running"
        return 1
    }
    SLURM_CONF=$CONF sinfo
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
env) echo "export SLURM_CONF=$CONF" ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
