"""Token-chunk drivers that keep vocabulary-sized tensors to one chunk at a time, forward and backward.

Shape legend: ``N`` rows, ``C`` rows of one chunk, ``D`` hidden size, ``V`` vocabulary.

Two autograd Functions, one per kind of head:

- ``recomputed_chunk``: for terms whose head *trains* (the student head). The forward runs the chunk
  without building a graph; the backward re-runs it with grad enabled and backpropagates through it
  (the reentrant-checkpoint pattern). Parameters reached through the head callable get their ``.grad``
  from that inner backward, so a ZeRO-3 module call works: its hooks gather the weight in both runs.
- ``eager_input_grad``: for terms whose head is *frozen* (teacher head, frozen copy of the student head).
  The forward computes the chunk loss and, immediately, its gradient w.r.t. the head *input* ``[C, D]``,
  then frees the logits; the backward only scales that stored gradient. No recomputation, and only a
  ``[N, D]`` gradient is kept. Parameters used inside ``fn`` receive NO gradient on this path, by design.

``chunked_head_loss`` is the generic driver built on the first: ``fn(*chunk_rows) -> (sum, *stats)``.

Assumptions: ``fn`` is deterministic (same output when re-run on the same inputs), and it must not
mutate its inputs. Non-differentiable extra outputs ("stats": counts, argmax hits) are summed over chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["HeadFn", "chunked_head_loss", "eager_input_grad", "recomputed_chunk", "split_rows"]

ChunkFn = Callable[..., tuple[Tensor, ...]]
HeadFn = Callable[[Tensor], Tensor]  # head(h_CD) -> logits_CV


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


def _grad_inputs(inputs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Detached copies of the inputs; those that required grad become fresh leaves that do again."""
    prepared = []
    for value in inputs:
        if isinstance(value, Tensor):
            leaf = value.detach()
            leaf.requires_grad_(value.requires_grad)
            prepared.append(leaf)
        else:
            prepared.append(value)
    return prepared


class _RecomputedChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: ChunkFn, first_pass_fn: ChunkFn | None, num_losses: int, *inputs: Tensor | None):
        ctx.fn = fn
        ctx.num_losses = num_losses
        ctx.save_for_backward(*[value if isinstance(value, Tensor) else None for value in inputs])
        ctx.input_is_tensor = [isinstance(value, Tensor) for value in inputs]
        ctx.non_tensor_inputs = [None if isinstance(value, Tensor) else value for value in inputs]
        with torch.no_grad():
            outputs = [out.detach() for out in (first_pass_fn or fn)(*inputs)]
        ctx.mark_non_differentiable(*outputs[num_losses:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        saved = ctx.saved_tensors
        inputs = [
            saved[i] if is_tensor else ctx.non_tensor_inputs[i] for i, is_tensor in enumerate(ctx.input_is_tensor)
        ]
        leaves = _grad_inputs(inputs)
        with torch.enable_grad():
            losses = ctx.fn(*leaves)[: ctx.num_losses]
        pairs = [(loss, grad) for loss, grad in zip(losses, grad_outputs, strict=False) if loss.requires_grad]
        if pairs:
            torch.autograd.backward([loss for loss, _ in pairs], [grad for _, grad in pairs])
        input_grads = [leaf.grad if isinstance(leaf, Tensor) and leaf.requires_grad else None for leaf in leaves]
        return (None, None, None, *input_grads)


def recomputed_chunk(
    fn: ChunkFn, *inputs: Tensor | None, first_pass_fn: ChunkFn | None = None, num_losses: int = 1
) -> tuple[Tensor, ...]:
    """Run ``fn(*inputs) -> (*loss_sums, *stats)`` without keeping its graph; recompute it in the backward.

    Args:
        fn: returns ``num_losses`` scalar differentiable sums followed by any number of non-differentiable
            stats (counts, hits).
        inputs: tensors (or ``None``); gradients flow to those that require grad, and to parameters
            ``fn`` reaches through closures (e.g. a head module), during the recomputation. The outer
            backward must be ``.backward()`` (as DeepSpeed's is), not ``torch.autograd.grad``, because
            parameter gradients are accumulated into ``.grad`` by the inner backward.
        first_pass_fn: optional replacement for the no-grad forward run that may reuse values the caller
            already holds (e.g. target logits computed for another term); it must return what ``fn`` would.
        num_losses: how many leading outputs carry gradient.

    Returns:
        the outputs of ``fn``, detached; only the first ``num_losses`` carry gradient.
    """
    return _RecomputedChunk.apply(fn, first_pass_fn, num_losses, *inputs)


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
        extras = [e.detach() if isinstance(e, Tensor) else e for e in extras]
        ctx.mark_non_differentiable(*[e for e in extras if isinstance(e, Tensor)])
        return (loss_sum.detach(), *extras)

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
    return _EagerInputGrad.apply(fn, x_CD, *others)


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
