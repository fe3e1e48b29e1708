"""Bad invocations of the launch scripts stop at once with exit status 2 and a message naming what is wrong,
before any process group or SLURM step is started. Runs without SLURM, MPI or GPUs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from launch_support import ROOT, run_env

SCRIPTS = sorted([*ROOT.glob("launch/*.sh"), *ROOT.glob("launch/slurm/*"), *ROOT.glob("launch/local_slurm/*.sh")])


def run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in run_env(**env).items() if not k.startswith("SLURM_") or k in env}
    return subprocess.run(["bash", str(ROOT / script), *args], env=clean, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_launch_script_parses(script: Path) -> None:
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        ("launch/slurm/train.sbatch", (), {}, "usage: sbatch [options] launch/slurm/train.sbatch CONFIG.yaml"),
        ("launch/slurm/train.sbatch", ("run.yaml",), {}, "not inside a SLURM job"),
        ("launch/slurm/train.sbatch", ("missing.yaml",), {"SLURM_JOB_ID": "7"}, "config missing.yaml not found"),
        ("launch/slurm/train.sbatch", ("configs/tests/tiny_dskd_eta.yaml",),
         {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "127.0.0.1",
          "LAUNCHER": "pdsh"}, "LAUNCHER must be torchrun or srun, got 'pdsh'"),
        ("launch/slurm/prealign.sbatch", (), {}, "usage: sbatch [options] launch/slurm/prealign.sbatch"),
        ("launch/slurm/prealign.sbatch", ("--out", "x"), {}, "not inside a SLURM job"),
        ("launch/run_deepspeed.sh", (), {}, "usage: [NUM_GPUS=n | HOSTFILE=hosts [NODE_RANK=i]]"),
        ("launch/run_deepspeed.sh", ("run.yaml",), {"NODE_RANK": "1"}, "NODE_RANK needs HOSTFILE"),
        ("launch/run_deepspeed.sh", ("run.yaml",), {"HOSTFILE": "/no/such/hostfile"},
         "HOSTFILE=/no/such/hostfile does not exist"),
        ("launch/run_mpi.sh", (), {"NP": "2"}, "usage: NP=<ranks>"),
        ("launch/run_mpi.sh", ("run.yaml",), {}, "set NP to the total number of ranks"),
        ("launch/local_slurm/slurm_up.sh", (), {}, "--dir DIR is required"),
        ("launch/local_slurm/slurm_up.sh", ("--dir", "/tmp/x", "--nodez", "2"), {}, "unknown argument '--nodez'"),
    ],
)
def test_bad_invocation_exits_2_naming_the_problem(script: str, args: tuple[str, ...], env: dict[str, str],
                                                   message: str) -> None:
    env = {"NP": "", "HOSTFILE": "", "NODE_RANK": "", "LAUNCHER": "", **env}
    done = run_script(script, *args, **env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
