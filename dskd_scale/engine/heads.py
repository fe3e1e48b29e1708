"""LM heads under ZeRO-3: every read of a partitioned weight happens inside a gather.

- Teacher head: frozen, so it is gathered ONCE at start-up into a full copy (``kd.teacher_head=gathered``),
  or applied through its module, whose ZeRO-3 hooks gather it per call (``module``: no resident copy).
- Student head: it changes every optimizer step. ``StudentHeadSnapshot.refresh`` gathers it once per step
  and, inside that one gather, takes the frozen copy used for t2s logits (``sg(W_s)``) and rebuilds the
  closed-form s2t map ``Q = pinv(W_t^O) sg(W_s^O)``. Trainable uses of the head (student CE and KD) call
  the module, so its gradient flows through DeepSpeed's hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import deepspeed
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Head = Callable[[Tensor], Tensor]


@contextmanager
def gathered(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Full parameters on every rank for the duration of the block (a no-op for unpartitioned ones).

    Read-only: changes made inside are discarded. To modify, use DeepSpeed's ``modifier_rank``.
    """
    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
        yield


def full_copy(param: nn.Parameter) -> Tensor:
    """A detached full copy of a (possibly partitioned) parameter."""
    with gathered([param]):
        return param.detach().clone()


def linear_head(weight_VD: Tensor) -> Head:
    """A head callable over a full frozen weight: ``h_ND -> h_ND @ W^T`` (no gradient to ``W``)."""
    frozen = weight_VD.detach()
    return lambda hidden_ND: F.linear(hidden_ND.to(frozen.dtype), frozen)


def module_head(module: nn.Module) -> Head:
    """A head callable through the module (ZeRO-3 hooks gather the weight for each call)."""
    return lambda hidden_ND: module(hidden_ND.to(next(iter(module.parameters())).dtype))


class StudentHeadSnapshot:
    """Per-step frozen view of the student head: ``sg(W_s)`` for t2s logits and the rebuilt s2t map.

    Args:
        head: the student's LM head module (partitioned under ZeRO-3).
        s2t_map: a ``PinvS2TMap`` to rebuild each step, or None.
        keep_frozen_copy: keep ``sg(W_s)`` for the t2s path (DSKD criteria).
    """

    def __init__(self, head: nn.Module, s2t_map=None, *, keep_frozen_copy: bool):
        self.head_module = head
        self.s2t_map = s2t_map
        self.keep_frozen_copy = keep_frozen_copy
        self.frozen_weight_VD: Tensor | None = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Gather the head once (all ranks, collective) and derive this step's frozen quantities."""
        weight = self.head_module.weight
        with gathered([weight]):
            if self.s2t_map is not None:
                self.s2t_map.rebuild(weight.detach())
            self.frozen_weight_VD = weight.detach().clone() if self.keep_frozen_copy else None

    def frozen_head(self) -> Head:
        if self.frozen_weight_VD is None:
            raise RuntimeError("StudentHeadSnapshot.refresh() must run (on all ranks) before the frozen head is used")
        return linear_head(self.frozen_weight_VD)
