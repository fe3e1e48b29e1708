"""The launch wrappers end a failed run with the failing rank's one-line error and its exit status (2 for bad
input), not the launcher's own status (torchrun: 1 after a ChildFailedError traceback). Two CPU ranks each,
stopped by a bad config override before any process group starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from launch_support import ROOT, TINY_CONFIG, free_port, run_env

pytestmark = [pytest.mark.dist]

BAD = "kd.temperature=-1"
MESSAGE = "kd.temperature (command line) must be > 0, got -1.0"


def _run(command: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = run_env(TMPDIR=str(tmp_path), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **env)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "DSKD_EXIT_DIR"):
        environment.pop(var, None)
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=180)


def _check_ends_with_the_rank_error(done: subprocess.CompletedProcess[str], wrapper: str, tmp_path: Path) -> None:
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    tail = done.stderr.rstrip().splitlines()[-2:]
    assert tail[0].startswith(f"[{wrapper}] rank 0 failed (exit 2): invalid config"), done.stderr[-3000:]
    assert tail[1].strip() == f"- {MESSAGE}", done.stderr[-3000:]
    assert not list(tmp_path.glob("dskd_exit.*")), "the wrapper left its exit folder behind"


def test_run_deepspeed_ends_with_the_rank_error_and_exit_2(tmp_path: Path) -> None:
    done = _run([str(ROOT / "launch/run_deepspeed.sh"), str(TINY_CONFIG), BAD], tmp_path, NUM_GPUS="2")
    _check_ends_with_the_rank_error(done, "run_deepspeed.sh", tmp_path)


def test_run_mpi_ends_with_the_rank_error_and_exit_2(tmp_path: Path) -> None:
    done = _run([str(ROOT / "launch/run_mpi.sh"), str(TINY_CONFIG), BAD], tmp_path, NP="2")
    _check_ends_with_the_rank_error(done, "run_mpi.sh", tmp_path)


def test_train_sbatch_with_torchrun_ends_with_the_rank_error_and_exit_2(tmp_path: Path) -> None:
    """train.sbatch -> srun -> torchrun_node.sh -> torchrun (2 ranks). ``srun`` is a one-node stand-in that runs
    its command as the only task (the real SLURM path is tested in test_slurm_train.py); torchrun itself exits 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/usr/bin/env bash\nwhile [[ \"$1\" == --* ]]; do shift; done\n"
                    "export SLURM_NNODES=1 SLURM_NODEID=0 SLURM_PROCID=0\nexec \"$@\"\n")
    srun.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_DIR": str(ROOT), "LAUNCHER": "torchrun", "NPROC_PER_NODE": "2"}
    done = _run(["bash", str(ROOT / "launch/slurm/train.sbatch"), str(TINY_CONFIG), BAD], tmp_path, **env)
    assert "training step exited with status 1" in done.stdout, done.stdout[-3000:]  # torchrun's own status
    _check_ends_with_the_rank_error(done, "train.sbatch", tmp_path)
