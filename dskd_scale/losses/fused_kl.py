"""Memory-lean forward and reverse KL rows with closed-form gradients.

Shape legend: ``N`` rows, ``V`` vocabulary.

The generic divergences build their value from autograd primitives, which keeps a dozen ``[N, V]``
intermediates alive until the backward. For the two KLs (the defaults of DSKD) this Function keeps only
its inputs and the ``[N]`` row values, and recomputes the two log-softmaxes in the backward:

- forward KL ``F = sum p (log p - log q)``:  dF/ds = (q - p) / tau_s,  dF/dt = p (log p - log q - F) / tau_t
- reverse KL ``R = sum q (log q - log p)``:  dR/ds = q (log q - log p - R) / tau_s,  dR/dt = (p - q) / tau_t

with ``q = softmax(s / tau_s)`` (student) and ``p = softmax(t / tau_t)`` (target). It is only used when
every logit is finite; ``divergences`` falls back to its masked path when a ``-inf`` entry is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_kl_rows"]


def _log_softmaxes(student_NV: Tensor, target_NV: Tensor, tau_s: float, tau_t: float) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(torch.promote_types(student_NV.dtype, target_NV.dtype), torch.float32)
    # Skip the division at temperature 1: it would be one more full [N, V] copy.
    log_q = F.log_softmax(student_NV if tau_s == 1.0 else student_NV / tau_s, dim=-1, dtype=dtype)
    log_p = F.log_softmax(target_NV if tau_t == 1.0 else target_NV / tau_t, dim=-1, dtype=dtype)
    return log_q, log_p


class _FusedKL(torch.autograd.Function):
    # In-place updates below reuse the [N, V] buffers: at most three are alive at any time.
    @staticmethod
    def forward(ctx, student_NV: Tensor, target_NV: Tensor, reverse: bool, tau_s: float, tau_t: float):
        log_q, log_p = _log_softmaxes(student_NV, target_NV, tau_s, tau_t)
        if reverse:
            weighted = log_q - log_p
            weighted.mul_(log_q.exp_())
        else:
            weighted = log_p - log_q
            weighted.mul_(log_p.exp_())
        del log_q, log_p
        rows_N = weighted.sum(-1)
        ctx.save_for_backward(student_NV, target_NV, rows_N)
        ctx.options = (reverse, tau_s, tau_t)
        return rows_N

    @staticmethod
    def backward(ctx, grad_rows_N: Tensor):
        student_NV, target_NV, rows_N = ctx.saved_tensors
        reverse, tau_s, tau_t = ctx.options
        need_student, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        log_q, log_p = _log_softmaxes(student_NV, target_NV, tau_s, tau_t)
        grad_N1 = grad_rows_N.unsqueeze(-1)
        grad_student = grad_target = None
        if reverse:
            if need_target:  # (p - q) / tau_t
                grad_target = (log_p.exp() - log_q.exp()).mul_(grad_N1 / tau_t).to(target_NV.dtype)
            if need_student:  # q (log q - log p - R) / tau_s
                q = log_q.exp()
                q.mul_(log_q.sub_(log_p).sub_(rows_N.unsqueeze(-1)))
                grad_student = q.mul_(grad_N1 / tau_s).to(student_NV.dtype)
        else:
            if need_target:  # p (log p - log q - F) / tau_t
                p = log_p.exp()
                p.mul_((log_p - log_q).sub_(rows_N.unsqueeze(-1)))
                grad_target = p.mul_(grad_N1 / tau_t).to(target_NV.dtype)
            if need_student:  # (q - p) / tau_s
                grad_student = log_q.exp_().sub_(log_p.exp_()).mul_(grad_N1 / tau_s).to(student_NV.dtype)
        return grad_student, grad_target, None, None, None


def fused_kl_rows(
    student_logits_NV: Tensor,
    target_logits_NV: Tensor,
    *,
    reverse: bool,
    temperature: float,
    target_temperature: float,
) -> Tensor:
    """Per-row forward KL(p||q) (``reverse=False``) or reverse KL(q||p), fp32 (fp64 for fp64 input) ``[N]``.

    All logits must be finite (the caller checks); gradients flow to whichever input requires grad.
    """
    return _FusedKL.apply(student_logits_NV, target_logits_NV, reverse, temperature, target_temperature)
