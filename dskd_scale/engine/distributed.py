"""Process-group set-up and the few collectives the loop needs (one call each, batched into one tensor).

Works under the ``deepspeed`` launcher, ``torchrun``, ``srun``/``mpirun`` (MPI discovery) and a plain
``python`` process, which becomes a world of one on a free local port.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

_LAUNCHER_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
# The shm comm op builds in about 30 s; a build lock older than this was left by a build that was killed.
STALE_BUILD_LOCK_S = 600.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_defaults() -> None:
    """A bare ``python launch/train.py`` is a world of one: give it the env:// variables a launcher would."""
    if any(var in os.environ for var in _LAUNCHER_RANK_VARS):
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return  # srun without the RANK mapping: leave it to MPI discovery
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _shm_op_builder():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder("ShareMemCommBuilder")


def shm_op_build_lock() -> Path:
    """The lock file torch's JIT takes while it builds (or checks) DeepSpeed's CPU shm comm op."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(_shm_op_builder().name, verbose=False)) / "lock"


def wait_for_build_lock(lock: Path, stale_after_s: float = STALE_BUILD_LOCK_S, poll_s: float = 1.0) -> None:
    """Return once ``lock`` is gone, removing it when it is older than ``stale_after_s``.

    torch waits forever on a JIT build's lock file, and a build killed half-way (Ctrl-C, a preempted job, an
    OOM-killed rank) leaves the file behind: every later run on the machine would then hang at start.
    A live build finishes and removes its lock long before it turns stale.
    """
    while True:
        try:
            age_s = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age_s > stale_after_s:
            warnings.warn(
                f"removing {lock}: a JIT build lock {age_s:.0f} s old was left by a killed build "
                f"(torch would wait on it forever)",
                stacklevel=2,
            )
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def build_cpu_shm_op() -> None:
    """Build (or load the built) CPU shm comm op once, so later runs pay no JIT; a stale lock is cleared first."""
    wait_for_build_lock(shm_op_build_lock())
    _shm_op_builder().load()


def init_distributed(backend: str = "", *, skip_cpu_shm_op: bool = False) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed once; returns ``(rank, world_size)``.

    Args:
        backend: "" picks nccl on GPU and gloo on CPU.
        skip_cpu_shm_op: do not JIT-build DeepSpeed's CPU shared-memory comm op (about 30 s on a fresh
            machine); collectives then stay plain gloo. CPU only.
    """
    _single_process_defaults()
    if skip_cpu_shm_op and not torch.cuda.is_available():
        # `import deepspeed.comm.torch as m` would bind the torch package (deepspeed.comm re-exports it).
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    elif not torch.cuda.is_available() and not dist.is_initialized():
        wait_for_build_lock(shm_op_build_lock())  # deepspeed builds the op inside init_distributed
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or default_backend(), verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` (any shape, float64 recommended for counts) over all ranks in one collective."""
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one: a collective decision (one all-reduce)."""
    value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=device())
    return bool(all_reduce_max(value).item() > 0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
