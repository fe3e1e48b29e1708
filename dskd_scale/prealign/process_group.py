"""Process groups for prealignment: a single process, or MPI ranks (``mpiexec -n N`` / ``srun --mpi=pmi2``).

Prealignment needs only three collectives: the rank/size to split shards, ``allgather`` of small Python
objects (each rank's error, if any, so that every rank fails together instead of waiting forever), and a
barrier. mpi4py is imported only when the environment shows an MPI or SLURM multi-task launch.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

# World sizes set by mpiexec (MPICH/Hydra, Open MPI, PMIx) and by srun for its job step. Not SLURM_NTASKS: it is
# also set inside an sbatch script, where the tool may run as one plain process.
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS")
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE",
                         "SLURM_NTASKS_PER_NODE")


class ProcessGroup(Protocol):
    rank: int
    size: int

    def allgather(self, value: Any) -> list[Any]: ...

    def barrier(self) -> None: ...


class SingleProcess:
    """The trivial group of one process."""

    rank = 0
    size = 1

    def allgather(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        return None


class MpiGroup:
    """``MPI.COMM_WORLD`` through mpi4py."""

    def __init__(self) -> None:
        from mpi4py import MPI

        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()

    def allgather(self, value: Any) -> list[Any]:
        return self._comm.allgather(value)

    def barrier(self) -> None:
        self._comm.Barrier()


def _launched_size() -> int:
    """The number of processes the launcher says it started (1 if none says so)."""
    for variable in _MPI_SIZE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def detect_process_group() -> ProcessGroup:
    """MPI when launched with several processes, otherwise a single process.

    Raises:
        RuntimeError: a multi-process launch where MPI does not see the other processes (e.g. ``srun`` without
            a PMI plugin matching the MPI library); running anyway would make every task redo all the work.
    """
    expected = _launched_size()
    if expected == 1:
        return SingleProcess()
    try:
        group = MpiGroup()
    except ImportError as error:
        raise RuntimeError(f"launched as {expected} processes but mpi4py is not importable ({error})") from error
    if group.size != expected:
        raise RuntimeError(
            f"the launcher started {expected} processes but MPI sees {group.size}; with SLURM use "
            "`srun --mpi=pmi2 ...` (or run `mpiexec -n N` inside the allocation)"
        )
    return group


def local_process_count() -> int:
    """Processes of this launch on this node (to share the node's cores among them)."""
    for variable in _LOCAL_SIZE_VARIABLES:
        value = os.environ.get(variable, "")
        # SLURM's per-node counts may look like "4(x2)" or "4,2"; the leading number is this kind of node's count.
        digits = value.split("(")[0].split(",")[0]
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def raise_if_any_failed(group: ProcessGroup, error: str | None, local_failure: BaseException | None,
                        failure_type: type[Exception], what: str) -> None:
    """Collective: every rank passes its own failure message (or None). A rank re-raises its own failure; the others
    raise ``failure_type`` naming every failed rank's message, so no rank goes on while another has stopped."""
    errors = [e for e in group.allgather(error) if e is not None]
    if local_failure is not None:
        raise local_failure
    if errors:
        raise failure_type(f"{what} failed on another rank: " + "; ".join(errors))
