"""A real local SLURM cluster (slurmctld + 2 slurmd "nodes" on 127.0.0.1) for the launch tests.

The fixture starts the daemons with launch/local_slurm/slurm_up.sh, yields a handle to submit and wait for
jobs, and always stops everything with slurm_down.sh (by pid file), even when a test fails. Tests skip only
when slurm-wlm is not installed and cannot be installed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from launch_support import PORT_BASE, ROOT, SLURM_UNAVAILABLE, SlurmCluster, run_env


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
