"""Rank-aware logging and progress bars.

The rank is read from the environment variables every launcher sets (RANK, then SLURM_PROCID,
PMI_RANK, OMPI_COMM_WORLD_RANK), so this works before torch.distributed is initialised.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")

_RANK_VARS = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK")


def process_rank() -> int:
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def is_rank_zero() -> bool:
    return process_rank() == 0


def get_logger(name: str, *, all_ranks: bool = False) -> logging.Logger:
    """A logger that prints ``[rank N]`` prefixed lines; non-zero ranks only log warnings unless ``all_ranks``."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [rank {process_rank()}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if (all_ranks or is_rank_zero()) else logging.WARNING)
    return logger


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterable[T]:
    """A tqdm bar on rank 0 only; other ranks iterate silently."""
    if not is_rank_zero():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
