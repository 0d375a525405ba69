#!/bin/bash
# A two-node SLURM cluster on one Linux machine, for testing multi-node jobs (examples/slurm/train.sbatch)
# without a real cluster: munge, one slurmctld in the host's network namespace and two slurmd, node1 and node2,
# each in a network namespace (and UTS namespace: `hostname` says node1 / node2) of its own. The namespaces are
# joined to the host by veth pairs on a bridge, so slurmctld, both slurmd, srun and the job's own traffic
# (torchrun's rendezvous, gloo) go between "nodes" over a network interface, not loopback. Only the network
# (and the host name) is separate: every node sees the same filesystem, users and processes, which serves as
# the cluster's shared filesystem.
#
#   sudo examples/slurm/two_node_cluster.sh up        # start (idempotent: a working cluster is left as it is)
#   eval "$(examples/slurm/two_node_cluster.sh env)"   # SLURM_CONF for sbatch / sinfo / scontrol / squeue
#   sbatch --nodes=2 ...
#   sudo examples/slurm/two_node_cluster.sh status    # exit 0 when both nodes answer
#   sudo examples/slurm/two_node_cluster.sh down      # stop everything, remove namespaces, links, state
#   examples/slurm/two_node_cluster.sh check           # exit 0 if this machine can run it, 3 (+ reason) if not
#
# Needs root, iproute2 (`ip netns`), util-linux (`unshare`, `runuser`) and Debian's slurm-wlm + munge
# (`apt-get install slurm-wlm munge`; tested with slurm 22.05). Exit codes: 0 ok, 1 failed (logs named),
# 2 usage, 3 this machine cannot run it (not root, missing binaries, no network namespaces).
#
# Settings (environment): STATE_DIR (default /tmp/mllm_mega_slurm2: slurm.conf, munge key and socket, spool,
# logs; removed by `down`), NET_PREFIX (default 10.77.0: the bridge is .1, node1 .11, node2 .12),
# SLURMCTLD_PORT (default 6917; slurmd listen on 6918 inside their namespaces).
#
# The cluster's configuration is not in /etc/slurm: clients need SLURM_CONF=$STATE_DIR/slurm.conf. A SLURM
# client without it (e.g. tests/slurm/test_slurm.py's `sinfo`, which looks for the machine's default cluster)
# does not see this cluster.
#
# Plugins chosen to work in an unprivileged-cgroup container: proctrack/linuxproc (a step's processes are found
# through /proc parentage, so a signal to the step reaches torchrun's workers too), task/none, no cgroups,
# no accounting. Node resources: CPUs = this machine's CPU count on each node (they share the CPUs).
set -uo pipefail

STATE_DIR=${STATE_DIR:-/tmp/mllm_mega_slurm2}
NET_PREFIX=${NET_PREFIX:-10.77.0}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6917}
SLURMD_PORT=6918
BRIDGE=mllmbr0
NODES=(node1 node2)
CONF=$STATE_DIR/slurm.conf
MUNGE_SOCKET=$STATE_DIR/munge/munge.socket.2

log() { echo "[two_node_cluster] $*"; }
die() { local rc=$1; shift; echo "[two_node_cluster] error: $*" >&2; exit "$rc"; }

ns_of() { echo "mllm_$1"; }                         # node1 -> network namespace mllm_node1
host_if() { echo "mllmv${1#node}"; }                # host end of the node's veth pair
addr_of() { echo "$NET_PREFIX.1${1#node}"; }        # node1 -> 10.77.0.11

# Why this machine cannot run the cluster (empty: it can).
unavailable() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "needs root (network namespaces, veth links, daemons as SlurmUser=root)"; return
    fi
    local missing=() b
    for b in ip nsenter unshare runuser munged slurmctld slurmd sbatch srun scontrol sinfo; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    if (( ${#missing[@]} )); then
        echo "missing ${missing[*]} (apt-get install slurm-wlm munge iproute2 util-linux)"; return
    fi
    if ! id munge >/dev/null 2>&1; then
        echo "no user munge (the munge package creates it)"; return
    fi
    if ip netns list 2>/dev/null | grep -qw mllm_node1; then
        return   # already made: the machine can
    fi
    local probe=mllm_probe_$$ err
    if ! err=$(ip netns add "$probe" 2>&1); then
        echo "cannot create a network namespace: ${err:-ip netns add failed}"; return
    fi
    if ! err=$(ip link add mllmprobe$$ type veth peer name mllmprobeb$$ 2>&1); then
        ip netns del "$probe" 2>/dev/null
        echo "cannot create a veth pair: ${err:-ip link add failed}"; return
    fi
    ip link del "mllmprobe$$" 2>/dev/null
    ip netns del "$probe" 2>/dev/null
    if ! err=$(unshare --uts --mount true 2>&1); then
        echo "cannot create UTS and mount namespaces: ${err:-unshare --uts --mount failed}"; return
    fi
}

require() {
    local why
    why=$(unavailable)
    [[ -z "$why" ]] || die 3 "$why"
}

export SLURM_CONF=$CONF

# Both nodes registered and usable (idle, mixed, allocated or completing; not down/unknown/drained).
nodes_ok() {
    [[ -f "$CONF" ]] || return 1
    local out
    out=$(timeout 15 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    local n
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc|comp)$" <<< "$out" || return 1
    done
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

daemons_ok() {
    pid_alive "$STATE_DIR/munged.pid" && pid_alive "$STATE_DIR/slurmctld.pid" || return 1
    local n
    for n in "${NODES[@]}"; do pid_alive "$STATE_DIR/slurmd-$n.pid" || return 1; done
}

write_conf() {
    local cpus host n
    cpus=$(nproc)
    host=$(hostname -s)
    cat > "$CONF" <<EOF
# generated by examples/slurm/two_node_cluster.sh $(date -u '+%F %T') UTC
ClusterName=mllm2node
SlurmctldHost=$host($NET_PREFIX.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeHostname=$n NodeAddr=$(addr_of "$n") CPUs=$cpus RealMemory=1024 State=UNKNOWN" >> "$CONF"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >> "$CONF"
}

# The hosts file each node sees as /etc/hosts (bind-mounted in its own mount namespace): node names resolve.
# And an empty resolv.conf: the machine's name server is not reachable from a node's namespace, and each
# lookup that falls through to DNS (e.g. an IPv6 address for a node name) would wait 10 s for it.
write_hosts() {
    local n
    : > "$STATE_DIR/resolv.conf"
    {
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$NET_PREFIX.1 $(hostname -s) mllm-ctl"
        for n in "${NODES[@]}"; do echo "$(addr_of "$n") $n"; done
    } > "$STATE_DIR/hosts"
}

setup_network() {
    ip link add "$BRIDGE" type bridge || return 1
    ip addr add "$NET_PREFIX.1/24" dev "$BRIDGE" || return 1
    ip link set "$BRIDGE" up || return 1
    local n ns hif
    for n in "${NODES[@]}"; do
        ns=$(ns_of "$n"); hif=$(host_if "$n")
        ip netns add "$ns" || return 1
        ip link add "$hif" type veth peer name veth0 netns "$ns" || return 1
        ip link set "$hif" master "$BRIDGE" || return 1
        ip link set "$hif" up || return 1
        ip -n "$ns" addr add "$(addr_of "$n")/24" dev veth0 || return 1
        ip -n "$ns" link set veth0 up || return 1
        ip -n "$ns" link set lo up || return 1
        ip -n "$ns" route add default via "$NET_PREFIX.1" || return 1
    done
    write_hosts
}

wait_for() {   # seconds, description, command...
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        (( SECONDS < deadline )) || { log "timed out after ${secs}s waiting for $what"; return 1; }
        sleep 0.5
    done
}

start_munge() {
    mkdir -p "$STATE_DIR/munge"
    chown munge:munge "$STATE_DIR/munge"
    chmod 0755 "$STATE_DIR/munge"
    dd if=/dev/urandom of="$STATE_DIR/munge/munge.key" bs=1024 count=1 status=none || return 1
    chown munge:munge "$STATE_DIR/munge/munge.key"
    chmod 0400 "$STATE_DIR/munge/munge.key"
    touch "$STATE_DIR/munged.pid" "$STATE_DIR/log/munged.log"
    chown munge:munge "$STATE_DIR/munged.pid" "$STATE_DIR/log/munged.log"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
        --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
        --seed-file="$STATE_DIR/munge/munge.seed" || return 1
    wait_for 20 "munged" test -S "$MUNGE_SOCKET"
}

cmd_up() {
    require
    if daemons_ok && nodes_ok; then
        log "already up ($CONF)"
        cmd_status
        return 0
    fi
    if [[ -e "$STATE_DIR" ]] || ip link show "$BRIDGE" >/dev/null 2>&1 || ip netns list | grep -qw "$(ns_of node1)"; then
        log "removing a previous, incomplete cluster first"
        cmd_down >/dev/null
    fi
    mkdir -p "$STATE_DIR"/{ctld,log,spool} || die 1 "cannot create $STATE_DIR"
    chmod 0755 "$STATE_DIR"
    write_conf
    setup_network || { cmd_down >/dev/null; die 1 "network setup failed (bridge $BRIDGE, veth pairs)"; }
    start_munge || { cmd_down >/dev/null; die 1 "munged did not start (see $STATE_DIR/log/munged.log)"; }
    slurmctld -f "$CONF" || { local_fail slurmctld; }
    wait_for 30 "slurmctld" pid_alive "$STATE_DIR/slurmctld.pid" || local_fail slurmctld
    local n ns
    for n in "${NODES[@]}"; do
        ns=$(ns_of "$n")
        mkdir -p "$STATE_DIR/spool/$n"
        # The node's network namespace, and a UTS namespace (`hostname` = the node name) and mount namespace
        # (/etc/hosts with the node names) of its own. Not `ip netns exec`: it remounts /sys, and slurmd 22.05
        # fails without the machine's /sys/fs/cgroup even with proctrack/linuxproc and task/none.
        nsenter --net="/run/netns/$ns" unshare --mount --uts sh -c \
            "mount --bind '$STATE_DIR/hosts' /etc/hosts && mount --bind '$STATE_DIR/resolv.conf' /etc/resolv.conf && hostname $n && exec slurmd -f '$CONF' -N $n" \
            || local_fail "slurmd-$n"
    done
    wait_for 60 "both nodes to register (sinfo)" nodes_ok || local_fail "slurmd-node1"
    log "up: slurmctld on $NET_PREFIX.1:$SLURMCTLD_PORT, node1 = $(addr_of node1), node2 = $(addr_of node2)"
    log "clients need: export SLURM_CONF=$CONF"
    timeout 15 sinfo -N
}

local_fail() {
    local name=$1
    echo "[two_node_cluster] error: $name did not start; last lines of $STATE_DIR/log/$name.log:" >&2
    tail -n 20 "$STATE_DIR/log/$name.log" >&2 2>/dev/null
    cmd_down >/dev/null
    exit 1
}

stop_pidfile() {   # pidfile name: SIGTERM, wait up to 15 s, then SIGKILL
    local f=$1 name=$2 pid
    [[ -f "$f" ]] || return 0
    pid=$(cat "$f" 2>/dev/null)
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        local i
        for i in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) did not stop: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
}

cmd_down() {
    [[ $(id -u) -eq 0 ]] || die 3 "needs root"
    local n ns pids
    if [[ -f "$CONF" ]] && command -v scancel >/dev/null; then
        timeout 15 scancel -u root >/dev/null 2>&1   # only this cluster's jobs: SLURM_CONF is ours
    fi
    for n in "${NODES[@]}"; do stop_pidfile "$STATE_DIR/slurmd-$n.pid" "slurmd-$n"; done
    stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld
    # whatever still runs inside a node's namespace (job steps left by a killed slurmd) was started by us
    for n in "${NODES[@]}"; do
        ns=$(ns_of "$n")
        if ip netns list | grep -qw "$ns"; then
            pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
            if [[ -n "${pids// /}" ]]; then
                log "killing processes left in $ns: $pids"
                # shellcheck disable=SC2086
                kill -KILL $pids 2>/dev/null
            fi
        fi
    done
    stop_pidfile "$STATE_DIR/munged.pid" munged
    for n in "${NODES[@]}"; do
        ip link del "$(host_if "$n")" 2>/dev/null
        ns=$(ns_of "$n")
        if ip netns list | grep -qw "$ns"; then
            ip netns del "$ns" || log "warning: could not delete network namespace $ns"
        fi
    done
    ip link del "$BRIDGE" 2>/dev/null
    if [[ -e "$STATE_DIR" ]]; then
        rm -rf "$STATE_DIR"
    fi
    log "down"
}

cmd_status() {
    local n rc=0 f
    for f in munged slurmctld slurmd-node1 slurmd-node2; do
        if pid_alive "$STATE_DIR/$f.pid"; then
            log "$f: running (pid $(cat "$STATE_DIR/$f.pid"))"
        else
            log "$f: not running"; rc=1
        fi
    done
    for n in "${NODES[@]}"; do
        if ip netns list 2>/dev/null | grep -qw "$(ns_of "$n")"; then
            log "$n: namespace $(ns_of "$n"), $(addr_of "$n")"
        else
            log "$n: no namespace"; rc=1
        fi
    done
    if [[ -f "$CONF" ]]; then
        timeout 15 sinfo -N 2>&1 || rc=1
        nodes_ok || { log "nodes not both usable"; rc=1; }
    else
        log "no $CONF"; rc=1
    fi
    (( rc == 0 )) && log "up (SLURM_CONF=$CONF)" || log "not up"
    return $rc
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    check)
        why=$(unavailable)
        if [[ -n "$why" ]]; then echo "$why"; exit 3; fi
        echo "ok" ;;
    *) echo "usage: $0 up|down|status|env|check" >&2; exit 2 ;;
esac
