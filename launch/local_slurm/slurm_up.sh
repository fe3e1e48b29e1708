#!/usr/bin/env bash
# Start a throw-away SLURM cluster on this one machine: one slurmctld and N slurmd "nodes" (n1..nN), all on
# 127.0.0.1 with their own ports, state and logs under DIR. Used by tests/launch (pytest fixture) and CI.
#
#   launch/local_slurm/slurm_up.sh --dir DIR [--nodes 2] [--port-base 29600]
#   export SLURM_CONF=DIR/slurm.conf            # (or: source DIR/env.sh) then sbatch/srun/squeue as usual
#   launch/local_slurm/slurm_down.sh --dir DIR  # stops everything this cluster started, by pid
#
# Ports: slurmctld = BASE, slurmd n<i> = BASE+i, srun's listening ports BASE+40..BASE+69; BASE+10..39 and
# BASE+70..99 stay free for rendezvous ports of the jobs.
# Exit status 3 means SLURM cannot run here: slurm-wlm is missing and not installable, or we are not root
# (tests skip on it).
# Why auth/none: munge needs a machine-wide daemon and key; a private test cluster must not touch either.
# Why proctrack/linuxproc + task/none: there is no systemd/cgroup delegation in a container.
set -euo pipefail

DIR=""
NODES=2
PORT_BASE=29600
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --port-base) PORT_BASE=$2; shift 2 ;;
    *) echo "slurm_up.sh: unknown argument '$1' (expected --dir DIR [--nodes N] [--port-base P])" >&2; exit 2 ;;
  esac
done
[ -n "$DIR" ] || { echo "slurm_up.sh: --dir DIR is required" >&2; exit 2; }

if ! command -v slurmctld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "slurm_up.sh: slurmctld missing, installing slurm-wlm with apt-get" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null) || true
  fi
  command -v slurmctld >/dev/null 2>&1 || {
    echo "slurm_up.sh: slurmctld is not installed and 'apt-get install slurm-wlm' was not possible" >&2; exit 3; }
fi
[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: slurmd must run as root (it starts job steps as their users)" >&2; exit 3; }
SLURMCTLD=$(command -v slurmctld)
SLURMD=$(command -v slurmd)

DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
  echo "slurm_up.sh: a cluster is already running from $DIR (stop it with slurm_down.sh --dir $DIR)" >&2
  exit 2
fi
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
for port in $(seq "$PORT_BASE" $((PORT_BASE + NODES))); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "slurm_up.sh: port $port is in use (another local cluster still running? slurm_down.sh --dir <its dir>)" >&2
    exit 2
  fi
done

HOST=$(hostname -s)
CPUS_PER_NODE=$(( $(nproc) / NODES ))
[ "$CPUS_PER_NODE" -ge 1 ] || CPUS_PER_NODE=1

{
  cat <<CONF
ClusterName=dskdlocal
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
SlurmUser=$(id -un)
SlurmdUser=root
SlurmctldPort=${PORT_BASE}
SlurmdPort=$((PORT_BASE + 1))
SrunPortRange=$((PORT_BASE + 40))-$((PORT_BASE + 69))
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/%n
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
CONF
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=n$i NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((PORT_BASE + i))" \
      "CPUs=${CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=n[1-${NODES}] Default=YES MaxTime=INFINITE State=UP"
} > "$DIR/slurm.conf"
echo "export SLURM_CONF=$DIR/slurm.conf" > "$DIR/env.sh"
export SLURM_CONF=$DIR/slurm.conf

# -c: start from a clean state (no jobs from an earlier cluster in the same DIR).
"$SLURMCTLD" -c -f "$SLURM_CONF"
for i in $(seq 1 "$NODES"); do "$SLURMD" -f "$SLURM_CONF" -N "n$i"; done

for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle' || true)
  if [ "$idle" -ge "$NODES" ]; then
    echo "slurm_up.sh: $NODES node(s) idle; export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm_up.sh: nodes did not become idle within 30 s; see $DIR/log/" >&2
sinfo -N >&2 || true
exit 1
