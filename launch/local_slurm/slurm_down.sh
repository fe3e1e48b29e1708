#!/usr/bin/env bash
# Stop a cluster started by slurm_up.sh --dir DIR: cancel its jobs, stop its daemons by their pid files, then
# end any job process still carrying this cluster's SLURM_CONF (by pid). Safe to run twice; always exits 0
# unless arguments are wrong, so it can sit in a `finally`/`trap`.
set -uo pipefail

DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    *) echo "slurm_down.sh: unknown argument '$1' (expected --dir DIR)" >&2; exit 2 ;;
  esac
done
[ -n "$DIR" ] || { echo "slurm_down.sh: --dir DIR is required" >&2; exit 2; }
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Cancel jobs first so slurmd can still clean up their steps; give them a few seconds.
if [ -f "$CONF" ] && alive "$DIR/slurmctld.pid"; then
  jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    # shellcheck disable=SC2086
    SLURM_CONF=$CONF scancel --full $jobs 2>/dev/null || true
    for _ in $(seq 1 20); do
      [ -z "$(SLURM_CONF=$CONF squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
fi

pids=()
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null && { kill "$pid" 2>/dev/null; pids+=("$pid"); }
done
for _ in $(seq 1 20); do
  left=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
  [ "$left" = 0 ] && break
  sleep 0.25
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null; done

# Job processes (slurmstepd and the ranks under it) inherit this cluster's SLURM_CONF; the ranks also carry
# SLURM_JOB_ID. Matching both keeps the shell that called us (which may have SLURM_CONF set) alive.
for envfile in /proc/[0-9]*/environ; do
  pid=${envfile#/proc/}; pid=${pid%/environ}
  [ "$pid" = "$$" ] && continue
  env_lines=$( { tr '\0' '\n' < "$envfile"; } 2>/dev/null) || continue
  grep -qxF "SLURM_CONF=$CONF" <<<"$env_lines" || continue
  if grep -q '^SLURM_JOB_ID=' <<<"$env_lines" || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ]; then
    kill -9 "$pid" 2>/dev/null
  fi
done
exit 0
