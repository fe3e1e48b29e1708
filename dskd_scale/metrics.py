"""Training metrics: accumulated locally as tensors, reduced across ranks in ONE all-reduce per log interval.

The anchor all-reduced 10-15 scalars every micro-step; here nothing is synchronised until ``reduce``.
Three kinds of value:
- ``add_global``: already a rank's share of a global mean (``combine_terms`` metrics, token counts):
  the cross-rank SUM is the global value, averaged over the optimizer steps of the interval;
- ``add_local``: a per-rank quantity (step time): the cross-rank MEAN, averaged over the steps;
- ``add_peak``: a per-rank quantity whose worst case matters (memory): the MAXIMUM over ranks and steps.
  Each rank writes its peak into its own slot of a ``[names, world]`` block of the same sum all-reduce,
  so the maximum costs no second collective;
- ``add_total``: a count to add up (non-finite micro-batches, tokens): the cross-rank SUM over the interval,
  not averaged; ``reduce_totals`` flushes only these (a checkpoint needs exact counters between log steps).
A ``add_global`` name that some steps leave out (the loss of a skipped step) is averaged over the steps that
added it, so a skipped step neither lowers nor raises the logged mean.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import psutil
import torch
from torch import Tensor

Reducer = Callable[[Tensor], Tensor]


class MetricWindow:
    def __init__(self) -> None:
        self._global: dict[str, Tensor] = {}
        self._local: dict[str, Tensor] = {}
        self._peak: dict[str, float] = {}
        self._total: dict[str, Tensor] = {}
        self._last: dict[str, float] = {}
        self._added_this_step: set[str] = set()
        self._steps_of: dict[str, int] = {}  # add_global name -> steps of the window that added it
        self.steps = 0

    @staticmethod
    def _add(store: dict[str, Tensor], name: str, value: Tensor | float) -> None:
        value = value.detach().to(torch.float64) if isinstance(value, Tensor) else torch.tensor(float(value),
                                                                                                 dtype=torch.float64)
        store[name] = store[name] + value.to(store[name].device) if name in store else value

    def add_global(self, name: str, value: Tensor | float) -> None:
        self._add(self._global, name, value)
        self._added_this_step.add(name)

    def add_total(self, name: str, value: Tensor | float) -> None:
        self._add(self._total, name, value)

    def add_local(self, name: str, value: Tensor | float) -> None:
        self._add(self._local, name, value)

    def add_peak(self, name: str, value: Tensor | float) -> None:
        self._peak[name] = max(self._peak.get(name, float("-inf")), float(value))

    def set_last(self, name: str, value: float) -> None:
        """A value identical on every rank (learning rate, grad norm): reported as its latest value."""
        self._last[name] = float(value)

    def end_step(self) -> None:
        self.steps += 1
        for name in self._added_this_step:
            self._steps_of[name] = self._steps_of.get(name, 0) + 1
        self._added_this_step.clear()

    def reduce_totals(self, all_reduce_sum: Reducer, device: torch.device) -> dict[str, float]:
        """Collective: the ``add_total`` sums over all ranks since the last flush (same names on every rank)."""
        names = sorted(self._total)
        if not names:
            return {}
        packed = all_reduce_sum(torch.stack([self._total[n].to(device) for n in names])).cpu().tolist()
        self._total = {}
        return dict(zip(names, packed, strict=True))

    def reduce(self, all_reduce_sum: Reducer, world_size: int, device: torch.device,
               rank: int | None = None) -> dict[str, float]:
        """Collective: every rank must call it at the same step with the same metric names. Resets the window.

        ``rank`` defaults to this process's rank in the default process group (0 without one).
        """
        if rank is None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        names_global, names_local, names_peak = sorted(self._global), sorted(self._local), sorted(self._peak)
        names_total = sorted(self._total)
        values = ([self._global[n] for n in names_global] + [self._local[n] for n in names_local]
                  + [self._total[n] for n in names_total])
        peaks = torch.zeros(len(names_peak), world_size, dtype=torch.float64)
        peaks[:, rank] = torch.tensor([self._peak[n] for n in names_peak], dtype=torch.float64)
        packed = torch.cat([torch.stack([v.to(device) for v in values]) if values
                            else torch.zeros(0, dtype=torch.float64, device=device), peaks.flatten().to(device)])
        if packed.numel():
            packed = all_reduce_sum(packed)
        packed = packed.cpu()
        steps = max(self.steps, 1)
        scalars = packed[: len(values)].tolist()
        result = {name: scalars[i] / max(self._steps_of.get(name, steps), 1) for i, name in enumerate(names_global)}
        offset = len(names_global)
        result.update({name: scalars[offset + i] / (steps * world_size) for i, name in enumerate(names_local)})
        offset += len(names_local)
        result.update({name: scalars[offset + i] for i, name in enumerate(names_total)})
        peak_values = packed[len(values):].view(len(names_peak), world_size).amax(dim=1).tolist() if names_peak else []
        result.update(dict(zip(names_peak, peak_values, strict=True)))
        result.update(self._last)
        self._global, self._local, self._peak, self._total, self._last, self.steps = {}, {}, {}, {}, {}, 0
        self._steps_of = {}
        return result


def memory_bytes() -> dict[str, float]:
    """Resident memory of this process now and at its peak (Linux ``ru_maxrss`` is in KiB), and accelerator
    memory when there is one. Logged with ``MetricWindow.add_peak``: the largest value of any rank."""
    stats = {"memory/rss_gb": psutil.Process(os.getpid()).memory_info().rss / 2**30,
             "memory/peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        stats["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return stats
