#!/usr/bin/env bash
# Sourced by the launch wrappers (run_deepspeed.sh, run_mpi.sh, slurm/train.sbatch); not run on its own.
#
# torchrun, deepspeed and mpiexec turn a rank's "exit 2: bad input" into their own status (torchrun: 1, after a
# ChildFailedError traceback). launch/train.py also leaves its one-line error and status in
# $DSKD_EXIT_DIR/rank<N>; after the launcher returns, the wrapper ends with the lowest rank's line and exits
# with its status (2 bad input, 3 diverged, 75 requeue). Ranks on other nodes write into their own (absent)
# copy of the folder, so only this node's ranks are read; a bad config fails on every rank, this node's too.

# rank_exit_init: make a fresh folder for the ranks and export DSKD_EXIT_DIR.
rank_exit_init() {
  DSKD_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/dskd_exit.XXXXXX")
  export DSKD_EXIT_DIR
}

# rank_exit_status TAG RC: print the first rank's error line, if the launch failed and a rank left one, and set
# RANK_EXIT_STATUS to the status to exit with (that rank's, else RC). Removes the folder.
rank_exit_status() {
  local tag=$1 file status message
  RANK_EXIT_STATUS=$2
  if [ "$RANK_EXIT_STATUS" -ne 0 ] && [ -d "${DSKD_EXIT_DIR:-}" ]; then
    file=$(find "$DSKD_EXIT_DIR" -maxdepth 1 -name 'rank*' -printf '%f\n' | sort -V | head -n 1)
    if [ -n "$file" ]; then
      status=$(head -n 1 "$DSKD_EXIT_DIR/$file")
      message=$(tail -n +2 "$DSKD_EXIT_DIR/$file")
      [[ "$status" =~ ^[0-9]+$ ]] && RANK_EXIT_STATUS=$status
      echo "[$tag] ${file/rank/rank } failed (exit $RANK_EXIT_STATUS): $message" >&2
    fi
  fi
  [ -n "${DSKD_EXIT_DIR:-}" ] && rm -rf "$DSKD_EXIT_DIR"
  return 0
}
