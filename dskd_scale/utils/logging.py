"""Rank-aware logging and progress displays (a tqdm bar on a terminal, periodic plain lines in log files).

The rank is read from the environment variables every launcher sets (RANK, then SLURM_PROCID,
PMI_RANK, OMPI_COMM_WORLD_RANK), so this works before torch.distributed is initialised.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

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


class _NoProgress:
    """What ranks other than 0 get: counts nothing, prints nothing."""

    def update(self, count: int = 1) -> None:
        return None

    def close(self) -> None:
        return None


class ProgressLines:
    """Progress as plain log lines, one every ``interval_s`` seconds and one at the end, for output that is not a
    terminal (SLURM logs, files): a carriage-return bar there becomes one unreadable line of redraws.

    Each line reads ``desc: done/total unit (percent), rate unit/s, elapsed H:MM:SS, ETA H:MM:SS``.
    """

    def __init__(self, total: int | None, *, desc: str, unit: str, interval_s: float = 30.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.interval_s = total, desc, unit, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.start = self.last_line = clock()
        self.closed = False

    def update(self, count: int = 1) -> None:
        self.done += count
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(self.clock())

    def _line(self, now: float) -> None:
        self.last_line = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.done}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:.1f} {self.unit}/s, elapsed {_clock_time(elapsed)}"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {_clock_time((self.total - self.done) / rate)}"
        print(f"{time.strftime('%H:%M:%S')} [rank {process_rank()}] {text}", file=self.stream, flush=True)


def _clock_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_counter(total: int | None, *, desc: str, unit: str = "it", interval_s: float = 30.0):
    """One progress display with ``update(count)`` and ``close()``: a tqdm bar (with ETA) on rank 0 when stderr is
    a terminal, ``ProgressLines`` on rank 0 otherwise, nothing on other ranks."""
    if not is_rank_zero():
        return _NoProgress()
    if not sys.stderr.isatty():
        return ProgressLines(total, desc=desc, unit=unit, interval_s=interval_s)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate with a ``progress_counter`` (tqdm on a terminal, log lines otherwise, rank 0 only)."""
    counter = progress_counter(total, desc=desc, unit=unit)
    try:
        for item in iterable:
            yield item
            counter.update(1)
    finally:
        counter.close()
