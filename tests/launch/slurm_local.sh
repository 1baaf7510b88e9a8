#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for tests/launch/test_slurm.py and CI (.ci/run).
#   tests/launch/slurm_local.sh install   # Debian's slurmctld, slurmd, slurm-client and munge (root, apt)
#   tests/launch/slurm_local.sh start     # munged, slurmctld, slurmd node1 and node2; reuses a running cluster
#   tests/launch/slurm_local.sh stop      # stops what start started, by the PIDs in its pid files
#   tests/launch/slurm_local.sh conf      # prints the slurm.conf path: clients need SLURM_CONF=<it>
#
# Debian builds Slurm with multiple-slurmd support, so two slurmd daemons on one host act as two
# nodes (node1, node2; one CPU each, NodeAddr 127.0.0.1). Everything (config, state, spool, logs, pid
# files) lives under SLURM_LOCAL_DIR (default /tmp/hybrid-lm-slurm). There is no systemd on CI
# machines, so the daemons are started by hand (munged, slurmctld, then one `slurmd -N` per node). Ports
# 16817 (slurmctld), 17001 and 17002 (slurmd) must be free.
set -euo pipefail
T=${SLURM_LOCAL_DIR:-/tmp/hybrid-lm-slurm}
conf=$T/etc/slurm.conf
export SLURM_CONF=$conf

die() { echo "slurm_local: $*" >&2; exit 1; }

write_conf() {
  mkdir -p "$T"/{etc,state,spool/node1,spool/node2,run,log}
  # A requeued job may start again only once its old credential expires (cred_expire, default 120 s)
  # and the scheduler next looks (sched_interval, default 60 s): 5 s and 1 s bring a requeue down
  # from minutes to about 6 s.
  # proctrack/linuxproc and task/none: only cgroup v1 is mounted on these machines.
  cat >"$conf" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool/%n
SlurmctldPidFile=$T/run/slurmctld.pid
SlurmdPidFile=$T/run/slurmd-%n.pid
SlurmctldLogFile=$T/log/slurmctld.log
SlurmdLogFile=$T/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=1 RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=1 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
}

both_idle() {
  [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | sort | tr '\n' ' ')" = "node1 idle node2 idle " ]
}

running() {  # both nodes answer (idle, or busy with a job)
  local states
  states=$(sinfo -h -N -o '%t' 2>/dev/null | sort | tr '\n' ' ') || return 1
  [[ "$states" =~ ^((idle|mix|alloc|comp)\ ){2}$ ]]
}

stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$f"
}

cmd_install() {
  if command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root (apt-get)"
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get to install it"
  # The packages try to start their services, which policy-rc.d refuses on CI machines: harmless.
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

cmd_start() {
  if [ -f "$conf" ] && running; then
    echo "slurm_local: reusing the running cluster ($conf)"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "starting slurmd needs root"
  command -v slurmd >/dev/null || die "Slurm is not installed (run: $0 install)"
  cmd_stop >/dev/null
  rm -rf "$T/state" "$T/spool"  # a fresh controller: no jobs left over from an earlier cluster
  write_conf
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
    touch "$T/run/munged.ours"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  slurmctld -f "$conf"
  slurmd -f "$conf" -N node1
  slurmd -f "$conf" -N node2
  for _ in $(seq 300); do both_idle && break; sleep 0.1; done
  both_idle || die "nodes not idle after 30 s: $(sinfo -N 2>&1 | tr '\n' ' '); logs in $T/log"
  echo "slurm_local: started node1 and node2 ($conf)"
}

cmd_stop() {
  stop_pidfile "$T/run/slurmd-node1.pid"
  stop_pidfile "$T/run/slurmd-node2.pid"
  stop_pidfile "$T/run/slurmctld.pid"
  if [ -f "$T/run/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$T/run/munged.ours"
  fi
}

[ $# -ge 1 ] || { echo "usage: $0 install|start|stop|conf ..." >&2; exit 2; }
for action in "$@"; do
  case $action in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    conf) echo "$conf" ;;
    *) echo "usage: $0 install|start|stop|conf ..." >&2; exit 2 ;;
  esac
done
