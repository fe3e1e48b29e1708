"""Token-chunk drivers that keep vocabulary-sized tensors to one chunk at a time, forward and backward.

Shape legend: ``N`` rows, ``C`` rows of one chunk, ``D`` hidden size, ``V`` vocabulary.

Drivers, one per kind of head:

- ``recomputed_chunk``: for terms whose head *trains* and is a plain callable (e.g. a ZeRO-3 module call).
  Non-reentrant activation checkpointing per chunk: the forward keeps none of the chunk's activations, the
  backward re-runs the chunk and backpropagates through it inside the same autograd graph. A ZeRO-3
  module call works: its hooks gather the weight in both runs, and its gradient hook fires once with the
  sum over chunks. ``chunked_head_loss`` is the generic driver built on it: ``fn(*chunk_rows) -> (sum, *stats)``.
- ``trainable_head_loss``: the generic driver of a loss of the trainable head's logits,
  ``fn(logits_CV, *chunk_rows)``: ``fused_head_chunk`` per chunk for a ``TrainableHead``, ``recomputed_chunk``
  for any other head callable.
- ``eager_input_grad`` / ``eager_head_grad``: for terms whose head is *frozen* (teacher head, frozen copy
  of the student head). The forward computes the chunk loss and, immediately, its gradient w.r.t. the head
  *input* ``[C, D]``, then frees the logits; the backward only scales that stored gradient. No
  recomputation, and only a ``[N, D]`` gradient is kept. Parameters used inside the head receive NO
  gradient on this path, by design.
- ``fused_head_chunk``: for a trainable head given as a ``TrainableHead``. The chunk's forward forms the
  logits, takes their gradient at once (weighted by the caller's expected loss weights), stores the
  ``[C, D]`` input gradient and adds the weight gradient into the head's ONE ``[V, D]`` accumulator with an
  in-place ``addmm``. The backward only checks that the received gradients are the expected weights times
  one common factor, and records that factor; ``TrainableHead.take_gradient`` scales the accumulator once.
  No recomputation, and exactly one ``[V, D]`` buffer however many chunks and uses. Received weights that
  are not proportional to the expected ones (any other use of the outputs) are still exact: that chunk is
  recomputed in the backward and the difference is added.

``eager_head_grad`` and ``fused_head_chunk`` take the head and a loss of its logits separately,
``fn(logits_CV, *chunk_rows) -> (*loss_sums, *stats)``: one head matmul per chunk, then the loss and its
logit gradient row block by row block, each block's gradient written over its own logits. A chunk thus
holds one ``[C, V]`` buffer (two when the caller keeps the logits) plus the temporaries of one block of
``C / 16`` rows, instead of the half-dozen ``[C, V]`` softmax and gradient copies of the loss maths.

Assumptions: ``fn`` is deterministic (same output when re-run on the same inputs), it must not mutate
its inputs, and its rows are independent (the loss sums and per-row stats of a block do not depend on
other rows). Non-differentiable extra outputs ("stats") are summed over chunks and blocks when 0-dim
(counts, argmax hits) and concatenated along the rows otherwise (per-row ids).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dskd_scale.losses.fused_kl import gradients_in_forward

__all__ = [
    "HeadFn",
    "TrainableHead",
    "chunked_head_loss",
    "eager_head_grad",
    "eager_input_grad",
    "fused_head_chunk",
    "recomputed_chunk",
    "split_rows",
    "trainable_head_loss",
]

ChunkFn = Callable[..., tuple[Tensor, ...]]
HeadFn = Callable[[Tensor], Tensor]  # head(h_CD) -> logits_CV
LogitsFn = Callable[..., tuple[Tensor, ...]]  # fn(logits_CV, *chunk_rows) -> (*loss_sums, *stats)
# Two received weights count as the expected ones times a common factor when they agree to this relative
# precision (they differ only by fp32 rounding of the same products in the caller's loss).
_PROPORTIONAL_RTOL = 1e-5
# The loss maths after a head runs on row blocks of ceil(C / _ROW_BLOCKS) rows: its vocabulary-sized
# temporaries (about seven blocks' worth for a KL with a fused CE, forward and gradient) then stay well below
# one [C, V] buffer, while the head matmuls and the weight-gradient addmm still see the whole chunk.
_ROW_BLOCKS = 16


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
        self._host_values: dict[int, tuple[Tensor, int, float]] = {}

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
        first = self.grad_sum is None
        if first:
            # bf16/fp16 heads accumulate in fp32: the sum runs over every chunk of every term, and rounding each
            # partial sum to 8 mantissa bits would lose the small chunks' contributions
            self.grad_sum = torch.empty_like(self.weight, dtype=torch.promote_types(self.weight.dtype, torch.float32))
        dtype = self.grad_sum.dtype
        # beta=0 on first use: addmm then ignores the uninitialised buffer (no zero fill of the [V, D] buffer)
        beta = 0.0 if first else 1.0
        self.grad_sum.addmm_(dlogits_CV.t().to(dtype), hidden_CD.detach().to(dtype), beta=beta, alpha=alpha)

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
        self._host_values.clear()
        return total

    def host_value(self, grad: Tensor) -> float:
        """``float(grad)`` of a received 0-dim gradient. Every chunk of one term receives the same tensor
        (the term is a sum of chunk outputs), so it is read once: one device sync per term and backward
        instead of one per chunk. A tensor changed in place since (another version) is read again."""
        known = self._host_values.get(id(grad))
        if known is not None and known[0] is grad and known[1] == grad._version:
            return known[2]
        value = float(grad)
        self._host_values[id(grad)] = (grad, grad._version, value)
        return value


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


class _EagerHeadGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: LogitsFn, head: HeadFn, keep_logits: bool, x_CD: Tensor, *others: Tensor | None):
        ctx.num_others = len(others)
        leaf = x_CD.detach().requires_grad_(True)
        with torch.enable_grad():
            logits_CV = head(leaf)
        values_CV = logits_CV.detach()
        # Without keep_logits each row block's gradient overwrites its own logits: one [C, V] buffer.
        dlogits_CV = torch.empty_like(values_CV) if keep_logits else values_CV
        sums, stats, _, (written,) = _blockwise_logit_grads(fn, values_CV, others, [(1.0,)], [dlogits_CV], 1)
        if written and logits_CV.requires_grad:
            (grad_x,) = torch.autograd.grad(logits_CV, leaf, dlogits_CV, allow_unused=True)
        else:
            grad_x = None
        del logits_CV, dlogits_CV
        ctx.save_for_backward(torch.zeros_like(leaf) if grad_x is None else grad_x)
        return (*sums, *stats, *([values_CV] if keep_logits else []))

    @staticmethod
    def backward(ctx, grad_sum: Tensor, *_grad_extras: Tensor):
        (grad_x,) = ctx.saved_tensors
        return (None, None, None, grad_sum * grad_x, *([None] * ctx.num_others))


def eager_head_grad(
    fn: LogitsFn, head: HeadFn, x_CD: Tensor, *others: Tensor | None, keep_logits: bool = False
) -> tuple[Tensor, ...]:
    """``eager_input_grad`` for a frozen head given apart from the loss: ``fn(head(x), *others)``.

    The head is applied once to the whole chunk; ``fn(logits_CV, *others) -> (loss_sum, *stats)`` runs on
    row blocks (every tensor in ``others`` is a row input, sliced with the logits), and each block's logit
    gradient overwrites its logits before one backward through the head gives the ``[C, D]`` input
    gradient. The head's backward must therefore not need its own output (true of a linear head; autograd
    raises otherwise).

    Returns:
        ``(loss_sum, *stats)`` (the stats detached), plus the chunk's logits ``[C, V]`` (detached) when ``keep_logits``
        (they are then not overwritten, at the cost of a second ``[C, V]`` buffer).
    """
    loss_sum, *extras = _EagerHeadGrad.apply(fn, head, keep_logits, x_CD, *others)
    return (loss_sum, *[e.detach() for e in extras])


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


def trainable_head_loss(
    fn: LogitsFn,
    head: HeadFn,
    hidden_ND: Tensor,
    *row_inputs: Tensor | None,
    chunk_size: int,
    expected_weights: Sequence[float],
) -> tuple[Tensor, ...]:
    """Sum over row chunks of ``fn(head(hidden_C), *rows_C) -> (*loss_sums, *stats)``, stats 0-dim.

    A ``TrainableHead`` runs ``fused_head_chunk``: ``fn`` sees row blocks of the chunk's logits and the weight
    gradient is accumulated in the forward, so nothing is recomputed in the backward when ``expected_weights``
    (see ``fused_head_chunk``) are right. ``fn`` then runs on row blocks: it must build any vocabulary-sized
    target (teacher logits) from its row inputs itself, never receive one, which would be kept for the
    backward. Any other head callable (e.g. a ZeRO-3 module call) runs ``recomputed_chunk`` on whole chunks.
    """
    if isinstance(head, TrainableHead) and hidden_ND.shape[0] > 0:
        totals: list[Tensor] | None = None
        for hidden_CD, *rows in split_rows([hidden_ND, *row_inputs], chunk_size):
            outputs = fused_head_chunk(fn, head, hidden_CD, *rows, expected_weights=expected_weights)
            totals = list(outputs) if totals is None else [a + b for a, b in zip(totals, outputs, strict=True)]
        return tuple(totals)

    def with_head(hidden_CD: Tensor, *rows: Tensor | None) -> tuple[Tensor, ...]:
        return fn(head(hidden_CD), *rows)

    return chunked_head_loss(with_head, hidden_ND, *row_inputs, chunk_size=chunk_size)


def _common_factor(received: Sequence[float], expected: Sequence[float]) -> float | None:
    """``c`` with ``received == c * expected`` (to fp32 rounding), or None when there is no such ``c``."""
    norm = sum(e * e for e in expected)
    if norm == 0.0:
        return 0.0 if all(r == 0.0 for r in received) else None
    factor = sum(r * e for r, e in zip(received, expected, strict=True)) / norm
    worst = max(abs(r - factor * e) for r, e in zip(received, expected, strict=True))
    return factor if worst <= _PROPORTIONAL_RTOL * max(abs(r) for r in received) else None


def _mix(grads: Sequence[Tensor | None], weights: Sequence[float]) -> Tensor | None:
    total = None
    for grad, weight in zip(grads, weights, strict=True):
        if grad is None or weight == 0.0:
            continue
        total = grad * weight if total is None else total.add_(grad, alpha=weight)
    return total


def _row_slice(value, rows: slice):
    return value[rows] if isinstance(value, Tensor) and value.dim() > 0 else value


def _blockwise_logit_grads(
    fn: LogitsFn,
    logits_CV: Tensor,
    others: Sequence,
    weight_sets: Sequence[Sequence[float]],
    outs: Sequence[Tensor],
    num_losses: int,
) -> tuple[list[Tensor], list[Tensor], list[bool], list[bool]]:
    """Evaluate ``fn(logits, *others)`` row block by row block, with logit gradients.

    For each weight set ``k``, ``outs[k]`` receives ``sum_i weight_sets[k][i] * d loss_i / d logits`` (zeros
    where nothing contributes). An out may be ``logits_CV`` itself: a block's logits are read before its
    gradient overwrites them.

    Returns:
        the loss sums (detached), the stats (0-dim ones summed, others concatenated along the rows), which
        losses carry gradient, and which outs received any gradient.
    """
    rows = logits_CV.shape[0]
    step = max(1, -(-rows // _ROW_BLOCKS))
    sums: list[Tensor] = []
    stat_parts: list[list[Tensor]] = []
    active = [False] * num_losses
    written = [False] * len(outs)
    overwrites = any(out is logits_CV for out in outs)
    storage = logits_CV.untyped_storage().data_ptr()
    for start in range(0, max(rows, 1), step):  # one (empty) block when there are no rows
        block = slice(start, start + step)
        # The block's backward follows at once: a fused KL may finish its gradient in the forward pass.
        with torch.enable_grad(), gradients_in_forward():
            leaf = logits_CV[block].detach().requires_grad_(True)
            outputs = fn(leaf, *[_row_slice(o, block) for o in others])
            losses = outputs[:num_losses]
            live = [loss.requires_grad for loss in losses]
            if len(weight_sets) == 1:  # one gradient of the weighted sum: a single block-sized buffer
                weighted = [w * loss for w, loss, on in zip(weight_sets[0], losses, live, strict=True) if on and w]
                grads = [torch.autograd.grad(sum(weighted), leaf)[0] if weighted else None]
            else:
                per_loss = _loss_gradients(losses, leaf)
                grads = [_mix(per_loss, weights) for weights in weight_sets]
        stats = [o.detach() for o in outputs[num_losses:]]
        if overwrites and any(t.numel() and t.untyped_storage().data_ptr() == storage for t in stats):
            raise RuntimeError("a loss of the logits returned a view of its logits as a stat; they are overwritten")
        for k, (out, grad) in enumerate(zip(outs, grads, strict=True)):
            if grad is None:
                out[block].zero_()
            else:
                out[block].copy_(grad)
                written[k] = True
        active = [a or on for a, on in zip(active, live, strict=True)]
        block_sums = [loss.detach() for loss in losses]
        sums = [a + b for a, b in zip(sums, block_sums, strict=True)] if sums else block_sums
        for index, stat in enumerate(stats):
            if index == len(stat_parts):
                stat_parts.append([])
            stat_parts[index].append(stat)
    merged = [sum(parts[1:], parts[0]) if parts[0].dim() == 0 else torch.cat(parts) for parts in stat_parts]
    return sums, merged, active, written


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


class _FusedHeadChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, head, expected, num_first_rows, hidden_CD, *row_inputs):
        num_losses = len(expected)
        others = row_inputs[: len(row_inputs) - num_first_rows]
        logits_CV = head.logits(hidden_CD.detach())
        # The weighted gradient of each row block overwrites its logits: one [C, V] buffer for the chunk.
        sums, stats, active, (written,) = _blockwise_logit_grads(
            fn, logits_CV, row_inputs, [expected], [logits_CV], num_losses
        )
        # A loss that does not depend on the logits (e.g. a CE with no labels) carries no gradient: its
        # expected weight is irrelevant, and so is whatever the caller backpropagates into it.
        expected = tuple(e if on else 0.0 for e, on in zip(expected, active, strict=True))
        if written:
            grad_hidden = (logits_CV.to(head.weight.dtype) @ head.weight).to(hidden_CD.dtype)
            head.accumulate(logits_CV, hidden_CD)
            head.pending += 1
        else:
            grad_hidden = torch.zeros_like(hidden_CD)
        ctx.counted = written
        del logits_CV
        ctx.fn, ctx.head, ctx.expected, ctx.active = fn, head, expected, active
        ctx.num_inputs = len(row_inputs)
        ctx.save_for_backward(hidden_CD, grad_hidden, *[o if isinstance(o, Tensor) else None for o in others])
        ctx.other_values = [None if isinstance(o, Tensor) else o for o in others]
        ctx.mark_non_differentiable(*stats)
        return (*sums, *stats)

    @staticmethod
    def backward(ctx, *grad_outputs):
        head, expected = ctx.head, ctx.expected
        head.pending -= int(ctx.counted)
        hidden_CD, grad_hidden, *saved = ctx.saved_tensors
        others = [s if s is not None else v for s, v in zip(saved, ctx.other_values, strict=True)]
        received = [
            0.0 if g is None or not active else head.host_value(g)
            for g, active in zip(grad_outputs[: len(expected)], ctx.active, strict=True)
        ]
        factor = _common_factor(received, expected)
        no_grads = (None, None, None, None)
        none_for_inputs = [None] * ctx.num_inputs
        if factor == 0.0:  # nothing received (the outputs were not used): take this use's share back out
            if any(expected):
                # The accumulator is scaled by the common factor later; a zero contribution needs
                # delta = 0 / scale - expected = -expected whatever that factor turns out to be.
                share_CV = head.logits(hidden_CD)
                _, _, _, (written,) = _blockwise_logit_grads(
                    ctx.fn, share_CV, others, [expected], [share_CV], len(expected)
                )
                if written:
                    head.accumulate(share_CV, hidden_CD, alpha=-1.0)
            return (*no_grads, torch.zeros_like(hidden_CD), *none_for_inputs)
        if head.scale is None:
            head.scale = factor if factor is not None else 1.0
        if factor is not None and abs(factor - head.scale) <= _PROPORTIONAL_RTOL * abs(head.scale):
            return (*no_grads, grad_hidden * factor, *none_for_inputs)
        # Not the expected weights: recompute this chunk and add the difference (exact, slower).
        delta = [r / head.scale - e for r, e in zip(received, expected, strict=True)]
        for_weight_CV = head.logits(hidden_CD)
        for_hidden_CV = torch.empty_like(for_weight_CV)
        _, _, _, (weight_written, hidden_written) = _blockwise_logit_grads(
            ctx.fn, for_weight_CV, others, [delta, received], [for_weight_CV, for_hidden_CV], len(expected)
        )
        if weight_written:
            head.accumulate(for_weight_CV, hidden_CD)
        if not hidden_written:
            return (*no_grads, torch.zeros_like(hidden_CD), *none_for_inputs)
        grad = (for_hidden_CV.to(head.weight.dtype) @ head.weight).to(hidden_CD.dtype)
        return (*no_grads, grad, *none_for_inputs)


def fused_head_chunk(
    fn: LogitsFn,
    head: TrainableHead,
    hidden_CD: Tensor,
    *others: Tensor | None,
    expected_weights: Sequence[float],
    first_pass_rows: Sequence[Tensor | None] = (),
) -> tuple[Tensor, ...]:
    """One chunk of a trainable-head loss, with the weight gradient accumulated in ``head`` during the forward.

    Args:
        fn: ``fn(logits_CV, *others) -> (*loss_sums, *stats)``; ``len(expected_weights)`` leading losses. It
            runs on row blocks of the chunk (every tensor in ``others`` is a row input).
        head: the ``TrainableHead``; its weight gets gradient only through ``head.take_gradient()``.
        hidden_CD: the chunk's head input (gradient flows to it through autograd as usual).
        others: further chunk inputs (labels, masks, targets); they get no gradient.
        expected_weights: ``d(loss to backward) / d(loss_i)`` as far as known (e.g. ``reduce.term_weights``),
            up to one factor common to every use of the head (DeepSpeed's 1/GA, a loss scale); 0 when not
            known. Any value gives exact gradients, provided an output given a non-zero weight is
            backpropagated (``take_gradient`` raises otherwise); the right one avoids recomputing the chunk
            in the backward.
        first_pass_rows: row inputs appended to ``others`` in the forward only (values the caller already
            holds, e.g. target logits computed for another term); a recomputation in the backward calls
            ``fn`` without them, so ``fn`` must then rebuild them, identically. They are not kept.

    Returns:
        the outputs of ``fn``; the stats are detached.
    """
    expected = tuple(float(w) for w in expected_weights)
    if not torch.is_grad_enabled() or not hidden_CD.requires_grad:
        # Nothing will be backpropagated: plain evaluation, no accumulation.
        with torch.no_grad():
            outputs = fn(head.logits(hidden_CD), *others, *first_pass_rows)
        return tuple(o.detach() for o in outputs)
    return _FusedHeadChunk.apply(fn, head, expected, len(first_pass_rows), hidden_CD, *others, *first_pass_rows)
