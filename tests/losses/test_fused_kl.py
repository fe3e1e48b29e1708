"""Fused KL rows: gradients finished in the forward (``gradients_in_forward``) and the non-finite fallback.

The reference is written from the equations with autograd primitives in fp64:
``F = sum p (log p - log q)``, ``R = sum q (log q - log p)``, ``q = softmax(s / tau_s)``, ``p = softmax(t / tau_t)``.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import reduction_tolerance

from dskd_scale.losses import DivergenceParams, divergence
from dskd_scale.losses.fused_kl import fused_kl_rows, gradients_in_forward

VOCAB = 37


def _reference_rows(student, target, *, reverse: bool, tau_s: float, tau_t: float):
    log_q = torch.log_softmax(student / tau_s, -1)
    log_p = torch.log_softmax(target / tau_t, -1)
    if reverse:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _logits(seed: int, rows: int = 5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(rows, VOCAB, generator=gen, dtype=dtype)).requires_grad_(True)
    target = (3 * torch.randn(rows, VOCAB, generator=gen, dtype=dtype)).requires_grad_(True)
    return student, target


def _values_and_grads(rows_fn, student, target, weights_N):
    rows_N = rows_fn(student, target)
    grad_s, grad_t = torch.autograd.grad((rows_N * weights_N).sum(), (student, target))
    return rows_N.detach(), grad_s, grad_t


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(("tau_s", "tau_t"), [(1.0, 1.0), (2.0, 2.0), (0.7, 1.6)])
@pytest.mark.parametrize("eager", [False, True])
def test_fused_matches_autograd_reference_fp64(reverse, tau_s, tau_t, eager):
    student, target = _logits(seed=int(reverse) + 10 * int(tau_s * 10))
    weights_N = torch.tensor([1.0, -0.5, 2.0, 0.0, 3.25], dtype=torch.float64)  # any incoming row gradient

    def fused(s, t):
        return fused_kl_rows(s, t, reverse=reverse, temperature=tau_s, target_temperature=tau_t)

    if eager:
        with gradients_in_forward():
            got = _values_and_grads(fused, student, target, weights_N)
    else:
        got = _values_and_grads(fused, student, target, weights_N)
    want = _values_and_grads(
        lambda s, t: _reference_rows(s, t, reverse=reverse, tau_s=tau_s, tau_t=tau_t), student, target, weights_N
    )
    tol = reduction_tolerance(torch.float64, 4 * VOCAB, scale=10.0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("reverse", [False, True])
def test_eager_gradient_only_for_inputs_that_require_it(reverse):
    student, target = _logits(seed=3)
    target = target.detach()
    with gradients_in_forward():
        rows_N = fused_kl_rows(student, target, reverse=reverse, temperature=2.0, target_temperature=2.0)
    (got,) = torch.autograd.grad(rows_N.sum(), student)
    want_rows = _reference_rows(student, target, reverse=reverse, tau_s=2.0, tau_t=2.0)
    (want,) = torch.autograd.grad(want_rows.sum(), student)
    torch.testing.assert_close(got, want, **reduction_tolerance(torch.float64, 4 * VOCAB, scale=10.0))


def test_eager_gradient_keeps_the_input_dtype():
    student, target = _logits(seed=4, dtype=torch.bfloat16)
    with gradients_in_forward():
        rows_N = fused_kl_rows(student, target, reverse=False, temperature=1.0, target_temperature=1.0)
    grad_s, grad_t = torch.autograd.grad(rows_N.sum(), (student, target))
    assert rows_N.dtype == torch.float32 and grad_s.dtype == grad_t.dtype == torch.bfloat16


def test_no_eager_work_without_grad_mode():
    student, target = _logits(seed=5)
    with gradients_in_forward(), torch.no_grad():
        rows_N = fused_kl_rows(student, target, reverse=False, temperature=1.0, target_temperature=1.0)
    assert not rows_N.requires_grad


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("eager", [False, True])
def test_neg_inf_logit_takes_the_masked_path(name, eager):
    """A -inf entry must give the masked-path result (the entry dropped), not the fused NaN, in both modes."""
    student, target = _logits(seed=6)
    with torch.no_grad():
        student[0, 3] = float("-inf")
        target[1, 5] = float("-inf")
    params = DivergenceParams(temperature=2.0)
    if eager:
        with gradients_in_forward():
            total, _ = divergence(name, student, target, params=params)
    else:
        total, _ = divergence(name, student, target, params=params)
    grad_s, grad_t = torch.autograd.grad(total, (student, target))
    assert torch.isfinite(total) and torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    # Reference (divergences' module doc): each side normalised over its own finite entries; an entry masked
    # on either side contributes 0.
    keep = torch.isfinite(student) & torch.isfinite(target)
    log_q = torch.log_softmax(student.detach() / 2.0, -1)
    log_p = torch.log_softmax(target.detach() / 2.0, -1)
    if name == "reverse_kl":
        log_p, log_q = log_q, log_p
    want = torch.where(keep, log_p.exp() * (log_p - log_q), 0.0).sum()
    torch.testing.assert_close(total.detach(), want.detach(), **reduction_tolerance(torch.float64, 8 * VOCAB))


def test_pos_inf_logit_is_not_repaired():
    """+inf is invalid input (module doc of divergences): the fused value stays non-finite, as before."""
    student, target = _logits(seed=7)
    with torch.no_grad():
        student[2, 0] = float("inf")
    total, _ = divergence("forward_kl", student, target)
    assert not torch.isfinite(total)


@pytest.mark.parametrize(("eager", "passes"), [(False, 2), (True, 1)])
def test_eager_mode_skips_the_backward_recomputation(monkeypatch, eager, passes):
    import dskd_scale.losses.fused_kl as fused_kl

    calls = []
    original = fused_kl._log_softmaxes
    monkeypatch.setattr(fused_kl, "_log_softmaxes", lambda *a: calls.append(1) or original(*a))
    student, target = _logits(seed=8)
    if eager:
        with gradients_in_forward():
            rows_N = fused_kl_rows(student, target, reverse=False, temperature=2.0, target_temperature=2.0)
    else:
        rows_N = fused_kl_rows(student, target, reverse=False, temperature=2.0, target_temperature=2.0)
    torch.autograd.grad(rows_N.sum(), (student, target))
    assert len(calls) == passes
