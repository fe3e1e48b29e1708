"""LM heads under ZeRO-3: every read of a partitioned weight happens inside a gather.

- Teacher head: frozen, gathered ONCE at start-up into a full copy.
- Student head: it changes every optimizer step. ``StudentHead.refresh`` gathers it once per step (one
  collective, the same on every rank) and, inside that gather, takes the full copy, rebuilds the
  closed-form s2t map ``Q = pinv(W_t^O) sg(W_s^O)`` and keeps ``sg(W_s)`` for t2s logits.

Why the trainable uses of the head do not call the module: the chunked losses call the head once per
token chunk (and again in the backward recomputation), and the number of chunks depends on each rank's
data. A ZeRO-3 module call is a collective (all-gather), so ranks would issue different numbers of them and
deadlock. Instead each micro-batch's trainable head is a ``TrainableHead`` over this step's gathered copy
(``trainable_head``): the chunked losses accumulate its weight gradient in ONE ``[V, D]`` buffer during the
forward; after the backward, ``route_gradients`` scales that buffer once and adds it to the real
parameter's ``.grad`` (as the gradient itself when there is none yet, so no copy), and the engine reduces
it once (``Engines.backward``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import deepspeed
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dskd_scale.losses import TrainableHead

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


class StudentHead:
    """Per-step view of the student head: gathered copy, frozen head, trainable leaves, s2t map rebuild.

    Args:
        head: the student's LM head module (partitioned under ZeRO-3).
        s2t_map: a ``PinvS2TMap`` to rebuild each step, or None.
    """

    def __init__(self, head: nn.Module, s2t_map=None, *, input_embedding: nn.Module | None = None):
        self.head_module = head
        self.s2t_map = s2t_map
        self.weight_VD: Tensor | None = None
        self._heads: list[TrainableHead] = []
        # Frozen input-embedding rows for the CMA baseline's index embeddings (same gather; shared when tied).
        self.input_embedding = input_embedding
        self.embedding_VF: Tensor | None = None

    @property
    def parameter(self) -> nn.Parameter:
        return self.head_module.weight

    @torch.no_grad()
    def refresh(self) -> None:
        """Gather the head once (all ranks, collective) and derive this step's quantities."""
        weight = self.head_module.weight
        embedding = None if self.input_embedding is None else self.input_embedding.weight
        tied = embedding is weight
        with gathered([weight] if embedding is None or tied else [weight, embedding]):
            if self.s2t_map is not None:
                self.s2t_map.rebuild(weight.detach())
            self.weight_VD = weight.detach().clone()
            if embedding is not None:
                self.embedding_VF = self.weight_VD if tied else embedding.detach().clone()

    def _weight(self) -> Tensor:
        if self.weight_VD is None:
            raise RuntimeError("StudentHead.refresh() must run (on all ranks) before the head is used")
        return self.weight_VD

    def frozen_head(self) -> Head:
        """``sg(W_s)``: gradient flows to the input only."""
        return linear_head(self._weight())

    def trainable_head(self) -> Head:
        """A ``TrainableHead`` over this step's copy; its weight gradient is routed to the parameter later.

        A frozen head (LoRA student: peft freezes the base weights) gets none: gradient reaches its input only.
        """
        if not self.parameter.requires_grad:
            return self.frozen_head()
        head = TrainableHead(self._weight())
        self._heads.append(head)
        return head

    def drop_leaves(self) -> None:
        """Forget this step's trainable heads without routing (after an evaluation forward)."""
        self._heads.clear()

    @torch.no_grad()
    def route_gradients(self) -> bool:
        """Add the trainable heads' gradients into the parameter's full-shape ``.grad``; True if there was any."""
        total = None
        for head in self._heads:
            grad = head.take_gradient()
            if grad is not None:
                total = grad if total is None else total.add_(grad)
        self._heads.clear()
        if total is None:
            return False
        param = self.head_module.weight
        if param.grad is not None:
            param.grad.add_(total)  # casts element by element: no second full-size copy of a bf16 gradient
            return True
        full_shape = tuple(getattr(param, "ds_shape", param.shape))
        data = param.data
        # A partitioned parameter's data is empty; the grad setter checks shapes, so present a zero-stride
        # full-shape view for the assignment only (no memory), then restore the partition.
        param.data = torch.empty(1, dtype=data.dtype, device=data.device).expand(full_shape)
        param.grad = total.to(data.dtype)
        param.data = data
        return True
