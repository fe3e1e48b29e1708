"""Memory-lean forward and reverse KL rows with closed-form gradients.

Shape legend: ``N`` rows, ``V`` vocabulary.

The generic divergences build their value from autograd primitives, which keeps a dozen ``[N, V]``
intermediates alive until the backward. For the two KLs (the defaults of DSKD) this Function keeps only
its inputs and the ``[N]`` row values, and recomputes the two log-softmaxes in the backward:

- forward KL ``F = sum p (log p - log q)``:  dF/ds = (q - p) / tau_s,  dF/dt = p (log p - log q - F) / tau_t
- reverse KL ``R = sum q (log q - log p)``:  dR/ds = q (log q - log p - R) / tau_s,  dR/dt = (p - q) / tau_t

with ``q = softmax(s / tau_s)`` (student) and ``p = softmax(t / tau_t)`` (target). Inside
``gradients_in_forward()`` (for callers that backpropagate each small block right after its forward, as the
chunked head drivers do) the forward instead finishes those gradients up to the incoming factor and keeps
them: no recomputation, and no more ``[N, V]`` buffers alive than the recomputing backward would hold.

Its input must be finite: a ``-inf`` (or NaN) logit makes that row's value non-finite (a ``0 * inf`` or
``inf - inf``), which ``divergences`` detects on the ``[N]`` rows before falling back to its masked path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_kl_rows", "gradients_in_forward"]

_GRADIENTS_IN_FORWARD: ContextVar[bool] = ContextVar("fused_kl_gradients_in_forward", default=False)


@contextmanager
def gradients_in_forward() -> Iterator[None]:
    """Within this block, a fused KL that will get gradients computes them in its forward (see the module doc).

    Use it only where the backward follows at once: the kept gradients cost one ``[N, V]`` fp32 buffer per
    input that requires grad, from the forward until the graph is freed.
    """
    token = _GRADIENTS_IN_FORWARD.set(True)
    try:
        yield
    finally:
        _GRADIENTS_IN_FORWARD.reset(token)


def _log_softmaxes(
    student_NV: Tensor, target_NV: Tensor, tau_s: float, tau_t: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(log_q, log_p, spare)``: ``spare`` is a free ``[N, V]`` buffer of the result dtype, or None.

    The scaled-logit buffer is reused (target, then student, then the caller's ``spare``): every fresh
    ``[N, V]`` allocation costs page faults on the first touch.
    """
    dtype = torch.promote_types(torch.promote_types(student_NV.dtype, target_NV.dtype), torch.float32)
    # Skip the division at temperature 1: it would be one more full [N, V] copy.
    scaled_target = target_NV if tau_t == 1.0 else target_NV / tau_t
    log_p = F.log_softmax(scaled_target, dim=-1, dtype=dtype)
    scratch = scaled_target if scaled_target is not target_NV else None
    if tau_s == 1.0:
        scaled_student = student_NV
    elif scratch is not None and scratch.dtype == student_NV.dtype and scratch.shape == student_NV.shape:
        scaled_student = torch.div(student_NV, tau_s, out=scratch)
    else:
        scaled_student = student_NV / tau_s
    log_q = F.log_softmax(scaled_student, dim=-1, dtype=dtype)
    if scaled_student is not student_NV:
        scratch = scaled_student
    spare = scratch if scratch is not None and scratch.dtype == dtype and scratch.shape == log_q.shape else None
    return log_q, log_p, spare


class _FusedKL(torch.autograd.Function):
    # In-place updates below reuse the [N, V] buffers: at most three are alive at any time.
    @staticmethod
    def forward(ctx, student_NV: Tensor, target_NV: Tensor, reverse: bool, tau_s: float, tau_t: float, eager: bool):
        log_q, log_p, spare = _log_softmaxes(student_NV, target_NV, tau_s, tau_t)
        need_student, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.options = (reverse, tau_s, tau_t, eager)
        ctx.dtypes = (student_NV.dtype, target_NV.dtype)
        if reverse:
            weighted = torch.sub(log_q, log_p, out=spare) if spare is not None else log_q - log_p
            q = log_q.exp_()
            weighted.mul_(q)
        else:
            weighted = torch.sub(log_p, log_q, out=spare) if spare is not None else log_p - log_q
            p = log_p.exp_()
            weighted.mul_(p)
        del spare
        rows_N = weighted.sum(-1)
        if not eager:
            del log_q, log_p, weighted
            ctx.save_for_backward(student_NV, target_NV, rows_N)
            return rows_N
        # The gradients times tau, as the recomputing backward forms them before its final scaling.
        grad_student = grad_target = None
        if reverse:
            if need_student:  # q (log q - log p - R)
                grad_student = weighted.addcmul_(q, rows_N.unsqueeze(-1), value=-1.0)
            if need_target:  # p - q
                grad_target = log_p.exp_().sub_(q)
        else:
            if need_target:  # p (log p - log q - F)
                grad_target = weighted.addcmul_(p, rows_N.unsqueeze(-1), value=-1.0)
            if need_student:  # q - p
                grad_student = log_q.exp_().sub_(p)
        del log_q, log_p, weighted
        ctx.save_for_backward(grad_student, grad_target)
        return rows_N

    @staticmethod
    def backward(ctx, grad_rows_N: Tensor):
        reverse, tau_s, tau_t, eager = ctx.options
        student_dtype, target_dtype = ctx.dtypes
        need_student, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_N1 = grad_rows_N.unsqueeze(-1)
        if eager:
            kept_student, kept_target = ctx.saved_tensors
            grad_student = None if kept_student is None else (kept_student * (grad_N1 / tau_s)).to(student_dtype)
            grad_target = None if kept_target is None else (kept_target * (grad_N1 / tau_t)).to(target_dtype)
            return grad_student, grad_target, None, None, None, None
        student_NV, target_NV, rows_N = ctx.saved_tensors
        log_q, log_p, _ = _log_softmaxes(student_NV, target_NV, tau_s, tau_t)
        grad_student = grad_target = None
        if reverse:
            if need_target:  # (p - q) / tau_t
                grad_target = (log_p.exp() - log_q.exp()).mul_(grad_N1 / tau_t).to(target_dtype)
            if need_student:  # q (log q - log p - R) / tau_s
                q = log_q.exp()
                q.mul_(log_q.sub_(log_p).sub_(rows_N.unsqueeze(-1)))
                grad_student = q.mul_(grad_N1 / tau_s).to(student_dtype)
        else:
            if need_target:  # p (log p - log q - F) / tau_t
                p = log_p.exp()
                p.mul_((log_p - log_q).sub_(rows_N.unsqueeze(-1)))
                grad_target = p.mul_(grad_N1 / tau_t).to(target_dtype)
            if need_student:  # (q - p) / tau_s
                grad_student = log_q.exp_().sub_(log_p.exp_()).mul_(grad_N1 / tau_s).to(student_dtype)
        return grad_student, grad_target, None, None, None, None


def fused_kl_rows(
    student_logits_NV: Tensor,
    target_logits_NV: Tensor,
    *,
    reverse: bool,
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """Per-row forward KL(p||q) (``reverse=False``) or reverse KL(q||p), fp32 (fp64 for fp64 input) ``[N]``.

    All logits must be finite (a row holding ``-inf`` or NaN comes out non-finite, for the caller to check);
    gradients flow to whichever input requires grad.
    """
    eager = (
        _GRADIENTS_IN_FORWARD.get()
        and torch.is_grad_enabled()
        and (student_logits_NV.requires_grad or target_logits_NV.requires_grad)
    )
    return _FusedKL.apply(student_logits_NV, target_logits_NV, reverse, temperature, target_temperature, eager)
