"""Divergences: golden values from independent pure-Python formulas, invariances, edge cases, gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import approx_tolerance, reduction_tolerance

from dskd_scale.losses import DIVERGENCES, DivergenceParams, divergence


def fp32_approx(value: float, terms: int, scale: float = 1.0):
    """``pytest.approx`` at the fp32 bound for ``terms`` accumulations (``tolerance.py``)."""
    return pytest.approx(value, **approx_tolerance(torch.float32, terms, scale=scale))

NAMES = sorted(DIVERGENCES)
SMOOTH_NAMES = [n for n in NAMES if n != "adaptive_kl"]  # AKL's weights are detached by design


# ---------- independent reference: plain Python floats, one row at a time ----------
def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def reference(name: str, student: list[float], target: list[float], **kw: float) -> float:
    tau = kw.get("temperature", 1.0)
    q, p = _softmax(student, tau), _softmax(target, kw.get("target_temperature") or tau)
    lam, beta, alpha = kw.get("skew_lambda", 0.1), kw.get("js_beta", 0.5), kw.get("akl_alpha", 0.5)
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skewed_forward_kl":
        return _kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q, strict=True)])
    if name == "skewed_reverse_kl":
        return _kl(q, [lam * y + (1 - lam) * x for x, y in zip(p, q, strict=True)])
    if name == "total_variation":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    if name == "adaptive_kl":
        order = sorted(range(len(p)), key=lambda i: p[i])
        cumulative, g_head, g_tail = 0.0, 0.0, 0.0
        for i in order:
            cumulative += p[i]
            if cumulative < alpha:
                g_tail += abs(p[i] - q[i])
            else:
                g_head += abs(p[i] - q[i])
        if g_head + g_tail == 0:
            return 0.0
        return (g_head * _kl(p, q) + g_tail * _kl(q, p)) / (g_head + g_tail)
    raise AssertionError(name)


STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, -1.0, 3.0, 0.25], [2.0, 2.0, 2.0, 2.0]]
TARGET = [[0.5, 1.0, 2.0, 0.0], [1.0, 1.5, 1.0, -2.0], [0.0, 3.0, -1.0, 1.0]]


def test_hand_computed_two_token_case():
    """p = (1/2, 1/2), q = (1/4, 3/4): values worked out on paper."""
    student, target = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)
    expected = {
        "forward_kl": 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0),  # 0.143841
        "reverse_kl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),  # 0.130812
        "total_variation": 0.25,
        "js": 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
        + 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)),  # 0.033822
    }
    assert expected["forward_kl"] == pytest.approx(0.143841, abs=1e-6)
    for name, value in expected.items():
        total, count = divergence(name, student, target)
        assert count.item() == 1
        assert total.item() == fp32_approx(value, 8), name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_golden_against_python_reference(name, temperature):
    params = DivergenceParams(temperature=temperature, skew_lambda=0.2, js_beta=0.3, akl_alpha=0.5)
    total, count = divergence(name, torch.tensor(STUDENT), torch.tensor(TARGET), params=params)
    kw = dict(temperature=temperature, skew_lambda=0.2, js_beta=0.3, akl_alpha=0.5)
    expected = sum(reference(name, s, t, **kw) for s, t in zip(STUDENT, TARGET, strict=True))
    assert count.item() == 3
    assert total.dtype == torch.float32
    assert total.item() == fp32_approx(expected, 4 * len(STUDENT[0]) * len(STUDENT))


def test_akl_mixed_head_and_tail_weights():
    """p = (.1, .3, .6), q = (.2, .3, .5), alpha = .5: tail gap .1 = head gap .1, so AKL = (FKL + RKL) / 2."""
    p, q = [0.1, 0.3, 0.6], [0.2, 0.3, 0.5]
    student, target = torch.tensor([q]).log(), torch.tensor([p]).log()
    expected = 0.5 * (_kl(p, q) + _kl(q, p))
    total, _ = divergence("adaptive_kl", student, target, params=DivergenceParams(akl_alpha=0.5))
    assert total.item() == fp32_approx(expected, 4 * 3)


def test_separate_target_temperature():
    params = DivergenceParams(temperature=2.0, target_temperature=0.5)
    total, _ = divergence("forward_kl", torch.tensor(STUDENT), torch.tensor(TARGET), params=params)
    kw = dict(temperature=2.0, target_temperature=0.5)
    expected = sum(reference("forward_kl", s, t, **kw) for s, t in zip(STUDENT, TARGET, strict=True))
    assert total.item() == fp32_approx(expected, 4 * len(STUDENT[0]) * len(STUDENT))


@pytest.mark.parametrize("name", NAMES)
def test_zero_when_equal_and_no_nan(name):
    logits = torch.randn(5, 9, requires_grad=True)
    total, _ = divergence(name, logits, logits.detach().clone())
    assert total.item() == fp32_approx(0.0, 9 * 5)
    total.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_invariant_to_constant_shift(name):
    torch.manual_seed(0)
    student, target = torch.randn(4, 7), torch.randn(4, 7)
    shift = torch.randn(4, 1) * 10
    base, _ = divergence(name, student, target)
    shifted, _ = divergence(name, student + shift, target - shift)
    # The shifted logits (|shift| up to ~30) carry their own rounding, which the softmax passes on unreduced.
    assert shifted.item() == fp32_approx(base.item(), 7 * 4, scale=float(shift.abs().max()) + 1.0)


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative(name):
    torch.manual_seed(1)
    values = DIVERGENCES[name](torch.randn(16, 11) * 3, torch.randn(16, 11) * 3, DivergenceParams())
    assert (values >= -reduction_tolerance(torch.float32, 11)["atol"]).all()


@pytest.mark.parametrize("name", SMOOTH_NAMES)
def test_gradcheck_float64(name):
    torch.manual_seed(2)
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = DivergenceParams(temperature=1.5)
    assert torch.autograd.gradcheck(lambda s, t: divergence(name, s, t, params=params)[0], (student, target))


def test_akl_gradient_is_fixed_weight_mix():
    """AKL's head/tail weights are constants in the backward (as in the reference code).

    Expected gradient from the equations, fp64: with q = softmax(s), p = softmax(t) and fixed weights,
    d FKL / d s = q - p and d RKL / d s = q * (log q - log p - RKL), row by row.
    """
    torch.manual_seed(3)
    student = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 6, dtype=torch.float64)
    params = DivergenceParams(akl_alpha=0.4)
    (grad_akl,) = torch.autograd.grad(divergence("adaptive_kl", student, target, params=params)[0], student)
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for row in range(3):
        p = [math.exp(x) for x in target[row].tolist()]
        q = [math.exp(x) for x in student[row].tolist()]
        p = [x / sum(p) for x in p]
        q = [x / sum(q) for x in q]
        cumulative, g_head, g_tail = 0.0, 0.0, 0.0
        for i in sorted(range(6), key=lambda i: p[i]):
            cumulative += p[i]
            if cumulative < 0.4:
                g_tail += abs(p[i] - q[i])
            else:
                g_head += abs(p[i] - q[i])
        w_head, w_tail = g_head / (g_head + g_tail), g_tail / (g_head + g_tail)
        rkl = _kl(q, p)
        for i in range(6):
            d_fkl = q[i] - p[i]
            d_rkl = q[i] * (math.log(q[i]) - math.log(p[i]) - rkl)
            expected[row, i] = w_head * d_fkl + w_tail * d_rkl
    assert 0.05 < w_head < 0.95, "the test must mix head and tail"
    torch.testing.assert_close(grad_akl, expected, **reduction_tolerance(torch.float64, 4 * 6))


def test_limits():
    torch.manual_seed(4)
    student, target = torch.randn(6, 8), torch.randn(6, 8)
    fkl, _ = divergence("forward_kl", student, target)
    rkl, _ = divergence("reverse_kl", student, target)
    no_skew = DivergenceParams(skew_lambda=0.0)
    tol = reduction_tolerance(torch.float32, 4 * 8 * 6, scale=float(fkl) + float(rkl))  # other code paths
    torch.testing.assert_close(divergence("skewed_forward_kl", student, target, params=no_skew)[0], fkl, **tol)
    torch.testing.assert_close(divergence("skewed_reverse_kl", student, target, params=no_skew)[0], rkl, **tol)
    all_head, all_tail = DivergenceParams(akl_alpha=0.0), DivergenceParams(akl_alpha=1.5)
    torch.testing.assert_close(divergence("adaptive_kl", student, target, params=all_head)[0], fkl, **tol)
    torch.testing.assert_close(divergence("adaptive_kl", student, target, params=all_tail)[0], rkl, **tol)
    # A strong skew pulls the mixture towards the distribution itself, so the skewed KL shrinks.
    strong = divergence("skewed_forward_kl", student, target, params=DivergenceParams(skew_lambda=0.9))[0]
    assert strong < fkl


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_entries_masked_on_both_sides_equal_dropping_them(name):
    torch.manual_seed(5)
    student, target = torch.randn(3, 6), torch.randn(3, 6)
    student_masked, target_masked = student.clone(), target.clone()
    student_masked[:, 4:] = float("-inf")
    target_masked[:, 4:] = float("-inf")
    student_masked.requires_grad_(True)
    total, _ = divergence(name, student_masked, target_masked)
    expected, _ = divergence(name, student[:, :4], target[:, :4])
    assert total.item() == fp32_approx(expected.item(), 4 * 6 * 3)
    total.backward()
    assert torch.isfinite(student_masked.grad).all()
    assert (student_masked.grad[:, 4:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_neg_inf_on_one_side_is_finite(name):
    torch.manual_seed(6)
    student = torch.randn(3, 6, requires_grad=True)
    target = torch.randn(3, 6)
    target[0, 2] = float("-inf")
    target[1, :] = float("-inf")  # a row with no target distribution at all
    total, _ = divergence(name, student, target)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(student.grad).all()
    # Forward KL: an entry with zero target probability contributes nothing, exactly as in the maths.
    if name == "forward_kl":
        first_row, _ = divergence(name, student[:1], target[:1])
        exact = reference("forward_kl", student[0].tolist(), target[0].tolist())
        assert first_row.item() == fp32_approx(exact, 4 * 6)


@pytest.mark.parametrize("name", NAMES)
def test_mask_excludes_rows_and_gives_zero_gradient_there(name):
    torch.manual_seed(7)
    student = torch.randn(4, 5, requires_grad=True)
    target = torch.randn(4, 5)
    garbage_student = student.detach().clone()
    garbage_student[1] = float("-inf")
    garbage_student[3] = 1e4
    garbage_student.requires_grad_(True)
    mask = torch.tensor([True, False, True, False])
    total, count = divergence(name, garbage_student, target, mask_N=mask)
    expected, _ = divergence(name, student[mask], target[mask])
    assert count.item() == 2
    assert total.item() == fp32_approx(expected.item(), 4 * 5 * 2)
    total.backward()
    assert torch.isfinite(garbage_student.grad).all()
    assert (garbage_student.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_is_zero_without_nan(name):
    student = torch.full((3, 4), float("-inf"), requires_grad=True)
    total, count = divergence(name, student, torch.randn(3, 4), mask_N=torch.zeros(3, dtype=torch.bool))
    assert total.item() == 0.0 and count.item() == 0
    total.backward()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_give_fp32_result(name):
    torch.manual_seed(8)
    student, target = torch.randn(5, 300).bfloat16(), torch.randn(5, 300).bfloat16()
    total, _ = divergence(name, student, target)
    expected, _ = divergence(name, student.float(), target.float())
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert total.item() == fp32_approx(expected.item(), 4 * 300 * 5)


def test_unknown_name_and_bad_shapes():
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        divergence("kl", torch.zeros(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="same shape"):
        divergence("forward_kl", torch.zeros(1, 2), torch.zeros(1, 3))
    assert DivergenceParams(temperature=0.0, js_beta=1.0).problems() == [
        "temperature must be > 0, got 0.0",
        "js_beta must be in (0, 1), got 1.0",
    ]
