"""Data-parallel evaluation with plain torch.distributed (no DeepSpeed): plan, shard, gather.

Batches are planned *globally* (all prompts sorted by length, longest first, cut into batches) and dealt to
ranks round-robin. Every batch therefore holds the same examples whatever the world size, which is what makes a
2-process run produce exactly the results of a 1-process run. Records are gathered to every rank and put back in
dataset order, so every rank computes the same aggregates and rank 0 writes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _adopt_slurm_env() -> None:
    """Under plain ``srun`` (one task per rank, no torchrun) take RANK/WORLD_SIZE/LOCAL_RANK from SLURM.

    Only when the job script exported MASTER_ADDR/MASTER_PORT: without a rendezvous address there is nothing
    to join, and guessing one would hang.
    """
    if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_from_env() -> DistContext:
    """Join the process group a launcher describes (torchrun, the deepspeed launcher, or srun with MASTER_ADDR).

    A single process with no launcher variables gets rank 0 of 1 and no process group. NCCL is used when CUDA is
    available, gloo otherwise.
    """
    _adopt_slurm_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistContext(0, 1, 0)


def current_context() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext(0, 1, 0)


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Positions grouped into batches of similar length (longest first, ties by position: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda position: (-lengths[position], position))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def batches_for_rank(batches: list[list[int]], context: DistContext) -> list[list[int]]:
    return batches[context.rank :: context.world_size]


def gather_records(records: list[dict[str, Any]], context: DistContext) -> list[dict[str, Any]]:
    """Every rank's records on every rank, sorted by their ``position`` key (dataset order)."""
    if context.world_size > 1:
        gathered: list[list[dict[str, Any]] | None] = [None] * context.world_size
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in (part or [])]
    return sorted(records, key=lambda record: record["position"])


def barrier(context: DistContext) -> None:
    if context.world_size > 1:
        dist.barrier()
