"""Training metrics: accumulated locally as tensors, reduced across ranks in ONE all-reduce per log interval.

The anchor all-reduced 10-15 scalars every micro-step; here nothing is synchronised until ``reduce``.
Two kinds of value:
- ``add_global``: already a rank's share of a global mean (``combine_terms`` metrics, token counts):
  the cross-rank SUM is the global value;
- ``add_local``: a per-rank quantity (step time, memory): the cross-rank MEAN is reported.
Both are averaged over the optimizer steps of the interval.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import psutil
import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]


class MetricWindow:
    def __init__(self) -> None:
        self._global: dict[str, Tensor] = {}
        self._local: dict[str, Tensor] = {}
        self._last: dict[str, float] = {}
        self.steps = 0

    @staticmethod
    def _add(store: dict[str, Tensor], name: str, value: Tensor | float) -> None:
        value = value.detach().to(torch.float64) if isinstance(value, Tensor) else torch.tensor(float(value),
                                                                                                 dtype=torch.float64)
        store[name] = store[name] + value.to(store[name].device) if name in store else value

    def add_global(self, name: str, value: Tensor | float) -> None:
        self._add(self._global, name, value)

    def add_local(self, name: str, value: Tensor | float) -> None:
        self._add(self._local, name, value)

    def set_last(self, name: str, value: float) -> None:
        """A value identical on every rank (learning rate, grad norm): reported as its latest value."""
        self._last[name] = float(value)

    def end_step(self) -> None:
        self.steps += 1

    def reduce(self, all_reduce_sum: Reducer, world_size: int, device: torch.device) -> dict[str, float]:
        """Collective: every rank must call it at the same step with the same metric names. Resets the window."""
        names_global, names_local = sorted(self._global), sorted(self._local)
        values = [self._global[n] for n in names_global] + [self._local[n] for n in names_local]
        if values:
            packed = all_reduce_sum(torch.stack([v.to(device) for v in values]))
            packed = packed.cpu().tolist()
        else:
            packed = []
        steps = max(self.steps, 1)
        result = {name: packed[i] / steps for i, name in enumerate(names_global)}
        offset = len(names_global)
        result.update({name: packed[offset + i] / (steps * world_size) for i, name in enumerate(names_local)})
        result.update(self._last)
        self._global, self._local, self._last, self.steps = {}, {}, {}, 0
        return result


def memory_bytes() -> dict[str, float]:
    """Resident memory of this process, and accelerator memory when there is one."""
    stats = {"memory/rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        stats["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats
