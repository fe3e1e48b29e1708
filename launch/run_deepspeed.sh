#!/usr/bin/env bash
# Launch launch/train.py with the `deepspeed` launcher, for machines without SLURM.
#
#   One node:              NUM_GPUS=8 launch/run_deepspeed.sh CONFIG.yaml [key=value ...]
#   N nodes, pdsh/ssh:     HOSTFILE=hosts launch/run_deepspeed.sh CONFIG.yaml [key=value ...]      (on node 0)
#   N nodes, no ssh:       HOSTFILE=hosts NODE_RANK=<i> MASTER_ADDR=<node0> launch/run_deepspeed.sh CONFIG.yaml ...
#                          (run it on every node, NODE_RANK 0..N-1, like a static torchrun rendezvous)
#
# HOSTFILE lines are `<host> slots=<gpus>`. With pdsh, every node must reach the others by passwordless ssh and
# see the same paths; environment variables (OMP_NUM_THREADS, DS_ACCELERATOR, ...) reach them only through
# ~/.deepspeed_env, ./.deepspeed_env or the file DS_ENV_FILE names (KEY=VALUE lines). SSH_PORT: sshd's port.
# Environment knobs (optional): PYTHON (interpreter whose bin/ holds `deepspeed`), MASTER_ADDR (default: first
# host of HOSTFILE), MASTER_PORT (default 29500), SSH_PORT, DS_LAUNCHER (pdsh | openmpi | mpich | mvapich | impi),
# TRAIN_SCRIPT (default launch/train.py), OMP_NUM_THREADS (default 1 per rank; the launcher does not set it).
# Hyperparameters belong in CONFIG and its overrides, not here.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: [NUM_GPUS=n | HOSTFILE=hosts [NODE_RANK=i]] launch/run_deepspeed.sh CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$ROOT/launch/train.py}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The launcher must come from the same environment as the ranks (python -m keeps that true).
launcher=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT" --no_local_rank)

if [ -z "${HOSTFILE:-}" ]; then
  [ -z "${NODE_RANK:-}" ] || { echo "run_deepspeed.sh: NODE_RANK needs HOSTFILE" >&2; exit 2; }
  launcher+=(--num_gpus "${NUM_GPUS:-1}")
else
  [ -f "$HOSTFILE" ] || { echo "run_deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
  first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
  [ -n "$first_host" ] || { echo "run_deepspeed.sh: HOSTFILE=$HOSTFILE lists no host" >&2; exit 2; }
  launcher+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$first_host}")
  if [ -n "${NODE_RANK:-}" ]; then
    # No ssh: this process starts only this node's ranks; the hostfile still fixes world size and rank offsets.
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
  else
    launcher+=(--launcher "${DS_LAUNCHER:-pdsh}")
    [ -z "${SSH_PORT:-}" ] || launcher+=(--ssh_port "$SSH_PORT")
  fi
fi

# A rank's one-line error (bad input: 2, diverged: 3, full disk: 75) ends the output and sets the exit status.
# shellcheck source=launch/rank_exit.sh
source "$ROOT/launch/rank_exit.sh"
rank_exit_init
exit_flag=()
if [ -n "${HOSTFILE:-}" ] && [ -z "${NODE_RANK:-}" ] && [ "$TRAIN_SCRIPT" = "$ROOT/launch/train.py" ]; then
  # pdsh/ssh: environment variables do not reach the ranks, so node 0's ranks get the folder as a flag
  exit_flag=(--exit-dir "$DSKD_EXIT_DIR")
fi
echo "[run_deepspeed.sh] ${launcher[*]} $TRAIN_SCRIPT ${exit_flag[*]} --config $CONFIG $*"
rc=0
"${launcher[@]}" "$TRAIN_SCRIPT" "${exit_flag[@]}" --config "$CONFIG" "$@" || rc=$?
rank_exit_status run_deepspeed.sh "$rc"
exit "$RANK_EXIT_STATUS"
