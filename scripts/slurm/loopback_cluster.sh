#!/usr/bin/env bash
# A real SLURM cluster on one machine: one slurmctld and N slurmd "nodes" (node1..nodeN), all on
# 127.0.0.1, with a private munged. Every piece of state (config, munge key and socket, spool,
# state, logs, pid files) lives under one directory, so several clusters can coexist and nothing
# system-wide is touched (no /etc/slurm, no /etc/munge, no /etc/hosts).
#
#   scripts/slurm/loopback_cluster.sh start  DIR [NODES=2] [CPUS_PER_NODE=2]
#   scripts/slurm/loopback_cluster.sh env    DIR     # prints `export SLURM_CONF=...`; eval it
#   scripts/slurm/loopback_cluster.sh status DIR
#   scripts/slurm/loopback_cluster.sh stop   DIR     # cancels jobs, stops daemons by pid file
#
# By hand:
#   scripts/slurm/loopback_cluster.sh start /tmp/vfslurm
#   eval "$(scripts/slurm/loopback_cluster.sh env /tmp/vfslurm)"
#   sinfo; srun -N2 -n2 hostname; sbatch ...
#   scripts/slurm/loopback_cluster.sh stop /tmp/vfslurm
#
# Needs root (slurmd runs jobs as their owner, and munged/slurm are started as root here) and the
# Debian packages slurm-wlm and munge (scripts/slurm/install_deps.sh installs them).
# Node names are not put in DNS: each node has NodeAddr=127.0.0.1 and the job script derives
# rendezvous addresses from NodeAddr (scripts/slurm/train.sbatch), as one should on any cluster.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
cmd=$1
dir=$(realpath -m "$2")
shift 2
conf="$dir/slurm.conf"
msock="$dir/munge/munge.socket"

log() { echo "[loopback-slurm] $*" >&2; }

free_ports() {  # N free TCP ports on 127.0.0.1, distinct
    python3 - "$1" <<'PY'
import socket, sys
socks, ports = [], []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
    ports.append(s.getsockname()[1])
print(" ".join(map(str, ports)))
PY
}

pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

read_pid() { [[ -f "$1" ]] && tr -dc '0-9' <"$1" || true; }

descendants() {  # all descendant pids of $1 (depth first, children before parents)
    local p c
    for c in $(cat /proc/[0-9]*/stat 2>/dev/null | awk -v p="$1" '$4 == p {print $1}'); do
        descendants "$c"
        echo "$c"
    done
}

stop_pid() {  # stop_pid PID NAME: TERM, wait up to 10 s, then KILL
    local pid=$1 name=$2 i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        pid_alive "$pid" || { log "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

node_names() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$conf"; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2 i
    shift 2
    for i in $(seq 1 $((t * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out after ${t}s waiting for $what"
    return 1
}

all_idle() {
    local states
    states=$(SLURM_CONF="$conf" sinfo -h -N -o '%t' 2>/dev/null) || return 1
    [[ -n "$states" ]] && ! grep -qv '^idle$' <<<"$states"
}

start() {
    local nodes=${1:-2} cpus=${2:-2}
    command -v slurmctld >/dev/null && command -v munged >/dev/null || {
        log "slurm-wlm/munge missing: run scripts/slurm/install_deps.sh"; exit 1; }
    if [[ -f "$conf" ]] && pid_alive "$(read_pid "$dir/run/slurmctld.pid")"; then
        log "a cluster is already running in $dir"; exit 1
    fi
    mkdir -p "$dir"/{munge,state,spool,log,run,tmp}
    chmod 700 "$dir/munge"

    # munge: private key, socket, pid, log, seed.
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$msock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" --num-threads=2
    wait_for 20 munged bash -c "munge -n -S '$msock' | unmunge -S '$msock'"

    local host ports
    host=$(hostname -s)
    read -r -a ports <<<"$(free_ports $((nodes + 2)))"
    {
        echo "# loopback cluster written by scripts/slurm/loopback_cluster.sh"
        echo "ClusterName=vfloop"
        echo "SlurmctldHost=${host}(127.0.0.1)"
        echo "SlurmctldPort=${ports[0]}"
        echo "SlurmdPort=${ports[1]}"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # cred_expire also delays a requeued job this long before it may start again (default 120 s).
        echo "AuthInfo=socket=$msock,cred_expire=${VF_LOOPBACK_CRED_EXPIRE:-10}"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/slurmd-%n"
        echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
        echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "PlugStackConfig=$dir/plugstack.conf"
        echo "TmpFS=$dir/tmp"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "SchedulerType=sched/backfill"
        # Look at pending jobs (a requeued one waiting out its begin time) every 2 s, not 60 s.
        echo "SchedulerParameters=sched_interval=2,bf_interval=2"
        echo "MpiDefault=none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=60"
        echo "InactiveLimit=0"
        echo "KillWait=20"
        echo "MinJobAge=3600"
        echo "Waittime=0"
        echo "MessageTimeout=20"
        local i
        for i in $(seq 1 "$nodes"); do
            echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${ports[$((i + 1))]} CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=loop Nodes=node[1-$nodes] Default=YES MaxTime=INFINITE State=UP"
    } >"$conf"
    : >"$dir/plugstack.conf"

    slurmctld -f "$conf" -c
    wait_for 30 slurmctld env SLURM_CONF="$conf" scontrol ping
    for i in $(seq 1 "$nodes"); do
        slurmd -f "$conf" -N "node$i"
    done
    if ! wait_for 60 "all nodes idle" all_idle; then
        SLURM_CONF="$conf" sinfo -N >&2 || true
        tail -n 20 "$dir"/log/*.log >&2 || true
        exit 1
    fi
    log "cluster up in $dir: $nodes nodes x $cpus CPUs, partition 'loop'; export SLURM_CONF=$conf"
}

stop() {
    [[ -d "$dir" ]] || { log "no cluster directory $dir"; return 0; }
    local ctld
    ctld=$(read_pid "$dir/run/slurmctld.pid")
    if [[ -f "$conf" ]] && pid_alive "$ctld"; then
        # Cancel every job (requeued ones included) and give the steps KillWait to end.
        SLURM_CONF="$conf" timeout 20 scancel --full --quiet --user=root 2>/dev/null || true
        local i
        for i in $(seq 1 50); do
            [[ -z "$(SLURM_CONF="$conf" timeout 10 squeue -h -t R,CG,CF,S -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    # Steps still running: slurmstepd processes of this cluster hold its slurmd log open.
    local p fd
    for p in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ "$(cat /proc/"$p"/comm 2>/dev/null)" == slurmstepd ]] || continue
        for fd in /proc/"$p"/fd/*; do
            if [[ "$(readlink "$fd" 2>/dev/null)" == "$dir"/* ]]; then
                local d
                for d in $(descendants "$p"); do kill -KILL "$d" 2>/dev/null || true; done
                kill -KILL "$p" 2>/dev/null || true
                log "killed leftover slurmstepd $p and its processes"
                break
            fi
        done
    done
    local f
    for f in "$dir"/run/slurmd-*.pid; do
        [[ -f "$f" ]] && stop_pid "$(read_pid "$f")" "$(basename "$f" .pid)"
    done
    stop_pid "$ctld" slurmctld
    stop_pid "$(read_pid "$dir/run/munged.pid")" munged
    rm -f "$dir"/run/*.pid
}

status() {
    local f ok=0
    for f in "$dir"/run/*.pid; do
        [[ -f "$f" ]] || continue
        if pid_alive "$(read_pid "$f")"; then echo "$(basename "$f" .pid): running (pid $(read_pid "$f"))"
        else echo "$(basename "$f" .pid): dead"; ok=1; fi
    done
    [[ -f "$conf" ]] && SLURM_CONF="$conf" timeout 10 sinfo -N || ok=1
    return $ok
}

case "$cmd" in
    start) start "$@" ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$conf" ;;
    *) usage ;;
esac
