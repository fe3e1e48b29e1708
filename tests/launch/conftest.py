"""A real local SLURM cluster (slurmctld + 2 slurmd "nodes" on 127.0.0.1) for the launch tests.

The fixture starts the daemons with launch/local_slurm/slurm_up.sh, yields a handle to submit and wait for
jobs, and always stops everything with slurm_down.sh (by pid file), even when a test fails. Tests skip only
when slurm-wlm is not installed and cannot be installed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from launch_support import PORT_BASE, ROOT, SLURM_UNAVAILABLE, VENV_PYTHON, DemoData, SlurmCluster, run_env


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    directory = tmp_path_factory.mktemp("slurm")
    up = subprocess.run([str(ROOT / "launch/local_slurm/slurm_up.sh"), "--dir", str(directory), "--nodes", "2",
                         "--port-base", str(PORT_BASE)], capture_output=True, text=True, timeout=300)
    try:
        if up.returncode == SLURM_UNAVAILABLE:
            pytest.skip(f"SLURM unavailable: {up.stderr.strip()}")
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield SlurmCluster(directory, run_env(SLURM_CONF=str(directory / "slurm.conf")))
    finally:
        subprocess.run([str(ROOT / "launch/local_slurm/slurm_down.sh"), "--dir", str(directory)], timeout=120)
        survivors = [pid.name for pid in directory.glob("*.pid") if _alive(int(pid.read_text()))]
        assert not survivors, f"slurm_down.sh left daemons running: {survivors}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> DemoData:
    """Demo tokenizers and data (tools/make_demo_assets.py) prealigned by one process (tools/prealign.py)."""
    root = tmp_path_factory.mktemp("demo")
    assets = root / "assets"
    make = subprocess.run([str(VENV_PYTHON), str(ROOT / "tools/make_demo_assets.py"), "--out", str(assets),
                           "--train", "160", "--valid", "8", "--test", "8"],
                          env=run_env(), capture_output=True, text=True, timeout=180)
    assert make.returncode == 0, make.stderr[-3000:]
    prealign_args = ("--teacher-tokenizer", str(assets / "teacher_tokenizer"), "--student-tokenizer",
                     str(assets / "student_tokenizer"), "--data", str(assets / "train.jsonl"), "--max-length", "128",
                     "--num-shards", "4", "--workers", "1")
    prealigned = root / "prealigned"
    single = subprocess.run([str(VENV_PYTHON), str(ROOT / "tools/prealign.py"), *prealign_args,
                             "--out", str(prealigned)], env=run_env(), capture_output=True, text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    return DemoData(assets, prealigned, prealign_args)
