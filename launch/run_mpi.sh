#!/usr/bin/env bash
# Launch launch/train.py with mpirun/mpiexec; ranks find each other through mpi4py (DeepSpeed's MPI discovery:
# rank 0's first `hostname -I` address becomes MASTER_ADDR).
#
#   NP=8 launch/run_mpi.sh CONFIG.yaml [key=value ...]                       (one node)
#   NP=16 HOSTS=node1:8,node2:8 launch/run_mpi.sh CONFIG.yaml [key=value ...] (several nodes, MPICH hydra)
#
# Environment knobs (optional): MPIEXEC (default: the mpiexec next to PYTHON, i.e. the MPI that mpi4py loads; a
# different MPI's mpirun fails with "unsupported PMI version"), PYTHON (default python3), HOSTS or HOSTFILE,
# MPI_EXTRA_ARGS (e.g. "--allow-run-as-root --oversubscribe" for Open MPI), TRAIN_SCRIPT (default
# launch/train.py). Hyperparameters belong in CONFIG and its overrides, not here.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: NP=<ranks> [HOSTS=h1:n,h2:n] launch/run_mpi.sh CONFIG.yaml [key=value ...]" >&2; exit 2
fi
CONFIG=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$ROOT/launch/train.py}
[ -n "${NP:-}" ] || { echo "run_mpi.sh: set NP to the total number of ranks" >&2; exit 2; }
python_bin=$(dirname "$(command -v "$PYTHON")")
MPIEXEC=${MPIEXEC:-$( [ -x "$python_bin/mpiexec" ] && echo "$python_bin/mpiexec" || command -v mpiexec || true)}
[ -n "$MPIEXEC" ] || { echo "run_mpi.sh: no mpiexec found (pip install mpich, or set MPIEXEC)" >&2; exit 2; }

mpi=("$MPIEXEC" -n "$NP")
[ -z "${HOSTS:-}" ] || mpi+=(-hosts "$HOSTS")
[ -z "${HOSTFILE:-}" ] || mpi+=(-f "$HOSTFILE")
# shellcheck disable=SC2206  # MPI_EXTRA_ARGS is a list of flags on purpose
[ -z "${MPI_EXTRA_ARGS:-}" ] || mpi+=($MPI_EXTRA_ARGS)

# MPICH forwards the whole environment; these keep ranks from oversubscribing cores and, across nodes, avoid
# PyPI MPICH's UCX netmod (it hangs without an RDMA fabric; only a few small messages go over MPI here).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export MPIR_CVAR_CH4_NETMOD=${MPIR_CVAR_CH4_NETMOD:-ofi} FI_PROVIDER=${FI_PROVIDER:-tcp}

# A rank's one-line error (bad input: 2, diverged: 3, full disk: 75) ends the output and sets the exit status.
# shellcheck source=launch/rank_exit.sh
source "$ROOT/launch/rank_exit.sh"
rank_exit_init
echo "[run_mpi.sh] ${mpi[*]} $PYTHON -u $TRAIN_SCRIPT --config $CONFIG $*"
rc=0
"${mpi[@]}" "$PYTHON" -u "$TRAIN_SCRIPT" --config "$CONFIG" "$@" || rc=$?
rank_exit_status run_mpi.sh "$rc"
exit "$RANK_EXIT_STATUS"
