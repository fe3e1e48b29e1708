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

Assumptions: ``fn`` is deterministic (same output when re-run on the same inputs), and it must not
mutate its inputs. Non-differentiable extra outputs ("stats": counts, argmax hits) are summed over chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

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
