"""Token-chunk drivers that keep vocabulary-sized tensors to one chunk at a time, forward and backward.

Shape legend: ``N`` rows, ``C`` rows of one chunk, ``D`` hidden size, ``V`` vocabulary.

Two drivers, one per kind of head:

- ``recomputed_chunk``: for terms whose head *trains* (the student head). Non-reentrant activation
  checkpointing per chunk: the forward keeps none of the chunk's activations, the backward re-runs the
  chunk and backpropagates through it inside the same autograd graph. A ZeRO-3 module call works: its
  hooks gather the weight in both runs, and its gradient hook fires once with the sum over chunks.
- ``eager_input_grad``: for terms whose head is *frozen* (teacher head, frozen copy of the student head).
  The forward computes the chunk loss and, immediately, its gradient w.r.t. the head *input* ``[C, D]``,
  then frees the logits; the backward only scales that stored gradient. No recomputation, and only a
  ``[N, D]`` gradient is kept. Parameters used inside ``fn`` receive NO gradient on this path, by design.

``chunked_head_loss`` is the generic driver built on the first: ``fn(*chunk_rows) -> (sum, *stats)``.

A third driver, ``fused_head_chunk``, serves a trainable head given as a ``TrainableHead``: the chunk's
forward forms the logits, takes their gradient at once (weighted by the caller's expected loss weights),
stores the ``[C, D]`` input gradient and adds the weight gradient into the head's ONE ``[V, D]``
accumulator with an in-place ``addmm``. The backward only checks that the received gradients are the
expected weights times one common factor, and records that factor; ``TrainableHead.take_gradient`` scales
the accumulator once. No recomputation, and exactly one ``[V, D]`` buffer however many chunks and uses.
Received weights that are not proportional to the expected ones (any other use of the outputs) are still
exact: that chunk is recomputed in the backward and the difference is added.

Assumptions: ``fn`` is deterministic (same output when re-run on the same inputs), and it must not
mutate its inputs. Non-differentiable extra outputs ("stats": counts, argmax hits) are summed over chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "HeadFn",
    "TrainableHead",
    "chunked_head_loss",
    "eager_input_grad",
    "fused_head_chunk",
    "recomputed_chunk",
    "split_rows",
]

ChunkFn = Callable[..., tuple[Tensor, ...]]
HeadFn = Callable[[Tensor], Tensor]  # head(h_CD) -> logits_CV
LogitsFn = Callable[..., tuple[Tensor, ...]]  # fn(logits_CV, *chunk_rows) -> (*loss_sums, *stats)
# Two received weights count as the expected ones times a common factor when they agree to this relative
# precision (they differ only by fp32 rounding of the same products in the caller's loss).
_PROPORTIONAL_RTOL = 1e-5


class TrainableHead:
    """A linear head ``h -> h @ W^T`` whose weight gradient is collected in ONE ``[V, D]`` accumulator.

    The chunked losses recognise it and run ``fused_head_chunk``; any other caller may simply call it, which
    builds a plain autograd leaf (its gradient is collected too). After the backward,
    ``take_gradient()`` returns the weight gradient (accumulator scaled in place, plus leaf gradients) and
    resets the head for the next micro-batch.

    Args:
        weight_VD: the full weight (detached here; e.g. this step's gathered copy under ZeRO-3).
    """

    def __init__(self, weight_VD: Tensor):
        self.weight = weight_VD.detach()
        self.grad_sum: Tensor | None = None  # sum over fused uses of expected_weight * dL/dW (the one buffer)
        self.scale: float | None = None  # received / expected weight, common to every fused use
        self.pending = 0  # fused chunks that accumulated with a non-zero weight and were not backpropagated yet
        self._leaf: Tensor | None = None

    def __call__(self, hidden_ND: Tensor) -> Tensor:
        """Autograd path for callers that do not use the fused driver: every call shares one leaf (one
        ``.grad`` buffer, accumulated by autograd)."""
        if self._leaf is None:
            self._leaf = self.weight.detach().requires_grad_(True)
        return F.linear(hidden_ND.to(self._leaf.dtype), self._leaf)

    def logits(self, hidden_ND: Tensor) -> Tensor:
        """Logits without any gradient bookkeeping."""
        return F.linear(hidden_ND.to(self.weight.dtype), self.weight)

    def accumulate(self, dlogits_CV: Tensor, hidden_CD: Tensor, *, alpha: float = 1.0) -> None:
        """``grad_sum += alpha * dlogits^T @ h`` in place (allocates the buffer on first use)."""
        if self.grad_sum is None:
            # bf16/fp16 heads accumulate in fp32: the sum runs over every chunk of every term, and rounding each
            # partial sum to 8 mantissa bits would lose the small chunks' contributions
            self.grad_sum = torch.zeros_like(self.weight, dtype=torch.promote_types(self.weight.dtype, torch.float32))
        dtype = self.grad_sum.dtype
        self.grad_sum.addmm_(dlogits_CV.t().to(dtype), hidden_CD.detach().to(dtype), alpha=alpha)

    def take_gradient(self) -> Tensor | None:
        """The weight gradient of the finished backward, or None; resets the head for the next one."""
        total = None
        if self.scale is not None and self.pending:
            raise RuntimeError(
                f"fused head: {self.pending} chunk(s) accumulated a weight gradient with a non-zero expected "
                "weight but were not backpropagated; give unused terms the expected weight 0"
            )
        if self.grad_sum is not None and self.scale is not None:
            total = self.grad_sum.mul_(self.scale)
        leaf_grad = None if self._leaf is None else self._leaf.grad
        if leaf_grad is not None:
            total = leaf_grad if total is None else total.add_(leaf_grad.to(total.dtype))
        self.grad_sum, self.scale, self.pending, self._leaf = None, None, 0, None
        return total


def split_rows(tensors: Sequence[Tensor | None], chunk_size: int) -> list[list[Tensor | None]]:
    """Split every tensor along dim 0 into chunks of ``chunk_size`` rows; ``None`` entries stay ``None``.

    Returns a list over chunks of per-tensor chunk views. All tensors must have the same number of rows.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError("split_rows needs at least one tensor")
    rows = present[0].shape[0]
    for tensor in present:
        if tensor.shape[0] != rows:
            raise ValueError(f"all row inputs must have {rows} rows, got shape {tuple(tensor.shape)}")
    if rows == 0:
        return []
    pieces = [t.split(chunk_size) if t is not None else None for t in tensors]
    num_chunks = (rows + chunk_size - 1) // chunk_size
    return [[p[k] if p is not None else None for p in pieces] for k in range(num_chunks)]


def recomputed_chunk(
    fn: ChunkFn, *inputs: Tensor | None, first_pass_fn: ChunkFn | None = None, num_losses: int = 1
) -> tuple[Tensor, ...]:
    """Run ``fn(*inputs) -> (*loss_sums, *stats)`` without keeping its activations; recompute in the backward.

    Built on ``torch.utils.checkpoint`` in non-reentrant mode: the recomputed ops join the ONE autograd
    graph, so a parameter used by every chunk (the student head) receives a single summed gradient. That
    is what ZeRO-3 needs (its per-parameter gradient hook must fire once per backward; a reentrant
    recompute would fire it once per chunk and trip its bucket assertion).

    Args:
        fn: returns ``num_losses`` scalar differentiable sums followed by non-differentiable stats.
        inputs: tensors (or ``None``); gradients flow to those that require grad and to parameters ``fn``
            reaches through closures (e.g. a head module, whose ZeRO-3 hooks gather it in both runs).
        first_pass_fn: optional replacement for the first (forward) run that may reuse values the caller
            already holds (e.g. target logits computed for another term); it must compute what ``fn``
            computes, with the same autograd-saved tensors, so the recomputation matches.
        num_losses: how many leading outputs carry gradient (documentation of the contract).

    Returns:
        the outputs of ``fn``; the stats are detached.
    """
    pending_first = [first_pass_fn] if first_pass_fn is not None else []

    def run(*args: Tensor | None) -> tuple[Tensor, ...]:
        chosen = pending_first.pop() if pending_first else fn
        return tuple(chosen(*args))

    if not torch.is_grad_enabled():
        outputs = run(*inputs)
    else:
        outputs = checkpoint(run, *inputs, use_reentrant=False)
    return (*outputs[:num_losses], *[stat.detach() for stat in outputs[num_losses:]])


class _EagerInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: ChunkFn, x_CD: Tensor, *others: Tensor | None):
        ctx.num_others = len(others)
        leaf = x_CD.detach().requires_grad_(True)
        with torch.enable_grad():
            loss_sum, *extras = fn(leaf, *others)
        if loss_sum.requires_grad:
            (grad_x,) = torch.autograd.grad(loss_sum, leaf, allow_unused=True)
            grad_x = torch.zeros_like(leaf) if grad_x is None else grad_x
        else:
            grad_x = torch.zeros_like(leaf)
        ctx.save_for_backward(grad_x)
        # Not marked non-differentiable: the marking keeps the tensors referenced by ctx until the backward,
        # i.e. one [C, V] target per chunk for a whole micro-batch. ``eager_input_grad`` detaches them.
        return (loss_sum.detach(), *[e.detach() if isinstance(e, Tensor) else e for e in extras])

    @staticmethod
    def backward(ctx, grad_sum: Tensor, *_grad_extras: Tensor):
        (grad_x,) = ctx.saved_tensors
        return (None, grad_sum * grad_x, *([None] * ctx.num_others))


def eager_input_grad(fn: ChunkFn, x_CD: Tensor, *others: Tensor | None) -> tuple[Tensor, ...]:
    """Evaluate ``fn(x, *others) -> (loss_sum, *extras)`` and its gradient w.r.t. ``x`` now, then drop the graph.

    Use only when ``fn`` reaches no trainable parameter: gradient flows to ``x_CD`` (and from there to
    whatever produced it, e.g. a projector), nowhere else. ``extras`` (argmax ids, hit counts, detached
    logits to reuse) are returned detached. The stored state is one ``[C, D]`` gradient.
    """
    loss_sum, *extras = _EagerInputGrad.apply(fn, x_CD, *others)
    return (loss_sum, *[e.detach() if isinstance(e, Tensor) else e for e in extras])


def chunked_head_loss(fn: ChunkFn, *row_inputs: Tensor | None, chunk_size: int) -> tuple[Tensor, ...]:
    """Sum ``fn`` over row chunks with backward recomputation per chunk.

    Args:
        fn: ``fn(*chunk_rows) -> (loss_sum, *stats)`` on one chunk of every row input; it typically calls
            a head (``head(h_CD) -> logits_CV``) and a divergence or cross-entropy on the logits.
        row_inputs: tensors with the same number of rows ``N`` (or ``None``), split along dim 0.
        chunk_size: rows per chunk; a value >= N runs the whole input as one chunk (the unchunked result).

    Returns:
        ``(loss_sum, *stats)`` summed over chunks. With ``N == 0`` every output is a zero scalar, and the
        number of outputs is taken from one call of ``fn`` on the empty rows.
    """
    chunks = split_rows(row_inputs, chunk_size)
    if not chunks:
        with torch.no_grad():
            empty = fn(*row_inputs)
        zero_sum = empty[0].detach() * 0.0
        # Keep the output attached to the graph so backward() on an empty batch still works.
        anchor = next((t for t in row_inputs if isinstance(t, Tensor) and t.requires_grad), None)
        if anchor is not None:
            zero_sum = zero_sum + anchor.sum() * 0.0
        return (zero_sum, *[torch.zeros_like(s) for s in empty[1:]])
    totals: list[Tensor] | None = None
    for chunk in chunks:
        outputs = recomputed_chunk(fn, *chunk)
        totals = list(outputs) if totals is None else [a + b for a, b in zip(totals, outputs, strict=True)]
    return tuple(totals)


def _common_factor(received: Sequence[float], expected: Sequence[float]) -> float | None:
    """``c`` with ``received == c * expected`` (to fp32 rounding), or None when there is no such ``c``."""
    norm = sum(e * e for e in expected)
    if norm == 0.0:
        return 0.0 if all(r == 0.0 for r in received) else None
    factor = sum(r * e for r, e in zip(received, expected, strict=True)) / norm
    worst = max(abs(r - factor * e) for r, e in zip(received, expected, strict=True))
    return factor if worst <= _PROPORTIONAL_RTOL * max(abs(r) for r in received) else None


def _loss_gradients(losses: Sequence[Tensor], logits_CV: Tensor) -> list[Tensor | None]:
    """d loss_i / d logits for each loss (None where a loss does not depend on the logits)."""
    grads: list[Tensor | None] = []
    for index, loss in enumerate(losses):
        if not loss.requires_grad:
            grads.append(None)
            continue
        retain = any(later.requires_grad for later in losses[index + 1 :])
        (grad,) = torch.autograd.grad(loss, logits_CV, retain_graph=retain, allow_unused=True)
        grads.append(grad)
    return grads


def _mix(grads: Sequence[Tensor | None], weights: Sequence[float]) -> Tensor | None:
    total = None
    for grad, weight in zip(grads, weights, strict=True):
        if grad is None or weight == 0.0:
            continue
        total = grad * weight if total is None else total.add_(grad, alpha=weight)
    return total


class _FusedHeadChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, first_fn, head, expected, hidden_CD, *others):
        num_losses = len(expected)
        with torch.enable_grad():
            logits_CV = head.logits(hidden_CD.detach()).detach().requires_grad_(True)
            outputs = first_fn(logits_CV, *others)
            losses = outputs[:num_losses]
            # A loss that does not depend on the logits (e.g. a CE with no labels) carries no gradient: its
            # expected weight is irrelevant, and so is whatever the caller backpropagates into it.
            expected = tuple(e if loss.requires_grad else 0.0 for e, loss in zip(expected, losses, strict=True))
            # One gradient of the weighted sum: a single [C, V] gradient buffer instead of one per loss.
            weighted = [e * loss for e, loss in zip(expected, losses, strict=True) if e != 0.0]
            dlogits_CV = torch.autograd.grad(sum(weighted), logits_CV)[0] if weighted else None
        if dlogits_CV is None:
            grad_hidden = torch.zeros_like(hidden_CD)
        else:
            grad_hidden = (dlogits_CV.to(head.weight.dtype) @ head.weight).to(hidden_CD.dtype)
            head.accumulate(dlogits_CV, hidden_CD)
            head.pending += 1
        ctx.counted = dlogits_CV is not None
        del logits_CV, dlogits_CV
        ctx.fn, ctx.head, ctx.expected = fn, head, expected
        ctx.active = [loss.requires_grad for loss in losses]
        ctx.num_others = len(others)
        ctx.save_for_backward(hidden_CD, grad_hidden, *[o if isinstance(o, Tensor) else None for o in others])
        ctx.other_values = [None if isinstance(o, Tensor) else o for o in others]
        stats = [o.detach() for o in outputs[num_losses:]]
        ctx.mark_non_differentiable(*stats)
        return (*[loss.detach() for loss in losses], *stats)

    @staticmethod
    def backward(ctx, *grad_outputs):
        head, expected = ctx.head, ctx.expected
        head.pending -= int(ctx.counted)
        hidden_CD, grad_hidden, *saved = ctx.saved_tensors
        others = [s if s is not None else v for s, v in zip(saved, ctx.other_values, strict=True)]
        received = [
            0.0 if g is None or not active else float(g)
            for g, active in zip(grad_outputs[: len(expected)], ctx.active, strict=True)
        ]
        factor = _common_factor(received, expected)
        none_for_others = [None] * ctx.num_others
        if factor == 0.0:  # nothing received (the outputs were not used): take this use's share back out
            if any(expected):
                # The accumulator is scaled by the common factor later; a zero contribution needs
                # delta = 0 / scale - expected = -expected whatever that factor turns out to be.
                share = _mix(_FusedHeadChunk._recompute(ctx, hidden_CD, others), expected)
                if share is not None:
                    head.accumulate(share, hidden_CD, alpha=-1.0)
            return (None, None, None, None, torch.zeros_like(hidden_CD), *none_for_others)
        if head.scale is None:
            head.scale = factor if factor is not None else 1.0
        if factor is not None and abs(factor - head.scale) <= _PROPORTIONAL_RTOL * abs(head.scale):
            return (None, None, None, None, grad_hidden * factor, *none_for_others)
        # Not the expected weights: recompute this chunk and add the difference (exact, slower).
        grads = _FusedHeadChunk._recompute(ctx, hidden_CD, others)
        delta = [r / head.scale - e for r, e in zip(received, expected, strict=True)]
        for_weight = _mix(grads, delta)
        if for_weight is not None:
            head.accumulate(for_weight, hidden_CD)
        for_hidden = _mix(grads, received)
        if for_hidden is None:
            return (None, None, None, None, torch.zeros_like(hidden_CD), *none_for_others)
        grad = (for_hidden.to(head.weight.dtype) @ head.weight).to(hidden_CD.dtype)
        return (None, None, None, None, grad, *none_for_others)

    @staticmethod
    def _recompute(ctx, hidden_CD: Tensor, others: list) -> list[Tensor | None]:
        with torch.enable_grad():
            logits_CV = ctx.head.logits(hidden_CD).detach().requires_grad_(True)
            return _loss_gradients(ctx.fn(logits_CV, *others)[: len(ctx.expected)], logits_CV)


def fused_head_chunk(
    fn: LogitsFn,
    head: TrainableHead,
    hidden_CD: Tensor,
    *others: Tensor | None,
    expected_weights: Sequence[float],
    first_pass_fn: LogitsFn | None = None,
) -> tuple[Tensor, ...]:
    """One chunk of a trainable-head loss, with the weight gradient accumulated in ``head`` during the forward.

    Args:
        fn: ``fn(logits_CV, *others) -> (*loss_sums, *stats)``; ``len(expected_weights)`` leading losses.
        head: the ``TrainableHead``; its weight gets gradient only through ``head.take_gradient()``.
        hidden_CD: the chunk's head input (gradient flows to it through autograd as usual).
        others: further chunk inputs (labels, masks, targets); they get no gradient.
        expected_weights: ``d(loss to backward) / d(loss_i)`` as far as known (e.g. ``reduce.term_weights``),
            up to one factor common to every use of the head (DeepSpeed's 1/GA, a loss scale); 0 when not
            known. Any value gives exact gradients, provided an output given a non-zero weight is
            backpropagated (``take_gradient`` raises otherwise); the right one avoids recomputing the chunk
            in the backward.
        first_pass_fn: optional replacement of ``fn`` for the forward (it may reuse values the caller holds).

    Returns:
        the outputs of ``fn``; the stats are detached.
    """
    expected = tuple(float(w) for w in expected_weights)
    if not torch.is_grad_enabled() or not hidden_CD.requires_grad:
        # Nothing will be backpropagated: plain evaluation, no accumulation.
        with torch.no_grad():
            outputs = (first_pass_fn or fn)(head.logits(hidden_CD), *others)
        return tuple(o.detach() for o in outputs)
    return _FusedHeadChunk.apply(fn, first_pass_fn or fn, head, expected, hidden_CD, *others)
