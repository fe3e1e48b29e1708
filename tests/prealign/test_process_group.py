"""Process-group detection from launcher environment variables (no processes started)."""

from __future__ import annotations

import pytest

from dskd_scale.prealign import process_group

_ALL = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "MPI_LOCALNRANKS",
        "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")


@pytest.fixture
def clean_env(monkeypatch):
    for variable in _ALL:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def test_plain_process_and_sbatch_script_are_single_process(clean_env):
    assert isinstance(process_group.detect_process_group(), process_group.SingleProcess)
    clean_env.setenv("SLURM_NTASKS", "8")  # inside sbatch, before any srun: still one process
    assert isinstance(process_group.detect_process_group(), process_group.SingleProcess)


def test_launch_that_mpi_cannot_see_is_refused(clean_env):
    # This test process is not part of a 4-process MPI world, so MPI sees 1 process: refuse, don't redo all work.
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(RuntimeError, match="started 4 processes but MPI sees 1.*srun --mpi=pmi2"):
        process_group.detect_process_group()


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("MPI_LOCALNRANKS", "2", 2), ("SLURM_STEP_TASKS_PER_NODE", "4(x2)", 4), ("SLURM_NTASKS_PER_NODE", "3,1", 3),
])
def test_local_process_count(clean_env, variable, value, expected):
    assert process_group.local_process_count() == 1
    clean_env.setenv(variable, value)
    assert process_group.local_process_count() == expected
