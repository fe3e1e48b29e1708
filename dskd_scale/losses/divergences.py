"""Token-level divergences between a student distribution and a target distribution.

Shape legend: ``N`` rows (tokens), ``V`` vocabulary entries.

Every divergence takes raw logits, divides both sides by a temperature, and does its softmax maths in
fp32 (fp64 when the inputs are fp64, so ``torch.autograd.gradcheck`` can run), whatever the input dtype.
With ``p`` the target distribution and ``q`` the student (trainable-side) distribution:

================== ===========================================================================
name               per-row value
================== ===========================================================================
forward_kl         KL(p || q) = sum p (log p - log q)
reverse_kl         KL(q || p)
js                 beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
skewed_forward_kl  KL(p || lam p + (1 - lam) q)           (DistiLLM; lam = 0 gives forward_kl)
skewed_reverse_kl  KL(q || lam q + (1 - lam) p)           (DistiLLM; lam = 0 gives reverse_kl)
adaptive_kl        (g_head FKL + g_tail RKL) / (g_head + g_tail)   (AKL, Wu et al. 2024)
total_variation    1/2 sum |p - q|
================== ===========================================================================

Defined behaviour at the edges (documented because it differs between published codebases):
- A ``-inf`` logit is a masked vocabulary entry. An entry masked on *either* side contributes 0 to the
  row's value, so no ``0 * inf`` or ``inf - inf`` ever reaches the result or the gradient.
- A row excluded by ``mask_N`` may hold anything finite or ``-inf``; it is zeroed before any maths, gives
  value 0 and exactly zero gradient, and is not counted.
- A counted row whose logits are ``-inf`` everywhere on one side has no distribution; it contributes 0.
- AKL at p == q has g_head = g_tail = 0; its value is then defined as 0 (the anchor code gives 0/0 = NaN).
- There is no temperature^2 gradient rescaling, as in the DSKD anchor code.
``+inf`` or NaN logits are invalid input and are not repaired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dskd_scale.losses.fused_kl import fused_kl_rows

__all__ = [
    "DIVERGENCES",
    "DivergenceParams",
    "adaptive_kl",
    "at_least_fp32",
    "divergence",
    "forward_kl",
    "js",
    "reverse_kl",
    "skewed_forward_kl",
    "skewed_reverse_kl",
    "total_variation",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DivergenceParams:
    """Hyperparameters shared by the divergences.

    Attributes:
        temperature: divides the student logits (and the target's, unless ``target_temperature`` is set).
        target_temperature: temperature of the target side; ``None`` means ``temperature``.
        skew_lambda: mixing weight lam of the skewed KLs, in [0, 1).
        js_beta: mixing weight beta of the generalised Jensen-Shannon divergence, in (0, 1).
        akl_alpha: cumulative target-probability mass that splits AKL's tail from its head.
    """

    temperature: float = 1.0
    target_temperature: float | None = None
    skew_lambda: float = 0.1
    js_beta: float = 0.5
    akl_alpha: float = 0.5

    def problems(self) -> list[str]:
        """Return human-readable problems with the values (empty when valid)."""
        found = []
        if not self.temperature > 0:
            found.append(f"temperature must be > 0, got {self.temperature}")
        if self.target_temperature is not None and not self.target_temperature > 0:
            found.append(f"target_temperature must be > 0, got {self.target_temperature}")
        if not 0.0 <= self.skew_lambda < 1.0:
            found.append(f"skew_lambda must be in [0, 1), got {self.skew_lambda}")
        if not 0.0 < self.js_beta < 1.0:
            found.append(f"js_beta must be in (0, 1), got {self.js_beta}")
        if not self.akl_alpha >= 0.0:
            found.append(f"akl_alpha must be >= 0, got {self.akl_alpha}")
        return found


def at_least_fp32(tensor: Tensor) -> Tensor:
    """Upcast bf16/fp16 to fp32; fp32 and fp64 stay as they are (fp64 keeps gradcheck exact)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class _Sides:
    """Log-probabilities and probabilities of both sides, with masked entries made harmless.

    ``entry_ok`` is False where either side's logit is -inf; there ``log_p``/``log_q`` hold 0 instead of
    -inf so products and differences stay finite in the forward and the backward pass.
    """

    __slots__ = ("entry_ok", "log_p", "log_q", "p", "q")

    def __init__(self, student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams):
        _check_shapes(student_logits_NV, target_logits_NV)
        target_temperature = params.target_temperature or params.temperature
        dtype = torch.promote_types(torch.promote_types(student_logits_NV.dtype, target_logits_NV.dtype), torch.float32)
        student = student_logits_NV.to(dtype) / params.temperature
        target = target_logits_NV.to(dtype) / target_temperature
        self.entry_ok = torch.isfinite(student) & torch.isfinite(target)
        self.log_q = _safe_log_softmax(student, self.entry_ok)
        self.log_p = _safe_log_softmax(target, self.entry_ok)
        self.q = self.log_q.exp() * self.entry_ok
        self.p = self.log_p.exp() * self.entry_ok


def _safe_log_softmax(scaled_logits_NV: Tensor, entry_ok_NV: Tensor) -> Tensor:
    """log_softmax over the finite entries; masked entries and rows with no finite entry read 0."""
    finite = torch.isfinite(scaled_logits_NV)
    row_max = torch.where(finite, scaled_logits_NV, torch.finfo(scaled_logits_NV.dtype).min).amax(-1, keepdim=True)
    row_max = row_max.detach().clamp_min(torch.finfo(scaled_logits_NV.dtype).min / 2)
    shifted = torch.where(finite, scaled_logits_NV - row_max, 0.0)
    exp = shifted.exp() * finite
    log_norm = exp.sum(-1, keepdim=True).clamp_min(torch.finfo(exp.dtype).tiny).log()
    return torch.where(entry_ok_NV, shifted - log_norm, 0.0)


def _mixture_log(weight_a: float, a_NV: Tensor, b_NV: Tensor, entry_ok_NV: Tensor) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b) on valid entries, 0 elsewhere (a, b are probabilities)."""
    mixture = weight_a * a_NV + (1.0 - weight_a) * b_NV
    return torch.where(entry_ok_NV, mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log(), 0.0)


def _kl(prob_a_NV: Tensor, log_a_NV: Tensor, log_b_NV: Tensor) -> Tensor:
    """sum_v a (log a - log b) per row; entries with a == 0 contribute exactly 0."""
    return (prob_a_NV * (log_a_NV - log_b_NV)).sum(-1)


def _check_shapes(student_logits_NV: Tensor, target_logits_NV: Tensor) -> None:
    if student_logits_NV.shape != target_logits_NV.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_NV.shape)} and target logits "
            f"{tuple(target_logits_NV.shape)} must have the same shape"
        )


def _all_finite(*tensors: Tensor) -> bool:
    """True when no entry is -inf (one reduction per tensor; +inf/NaN are invalid input anyway)."""
    return all(t.numel() == 0 or bool(t.detach().amin() > float("-inf")) for t in tensors)


def _kl_rows(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams, *, reverse: bool) -> Tensor:
    """KL(p || q) (``reverse=False``) or KL(q || p) per row, fp32 ``[N]``; finite input takes the fused path."""
    _check_shapes(student_logits_NV, target_logits_NV)
    rows_N = fused_kl_rows(
        student_logits_NV,
        target_logits_NV,
        reverse=reverse,
        temperature=params.temperature,
        target_temperature=params.target_temperature or params.temperature,
    )
    # A -inf (or NaN) logit makes its fused row non-finite (a 0 * inf or inf - inf), so checking the [N] rows
    # replaces two full-size scans of the logits on valid input; the scans then only decide the rare case.
    if bool(torch.isfinite(rows_N).all()) or _all_finite(student_logits_NV, target_logits_NV):
        return rows_N
    s = _Sides(student_logits_NV, target_logits_NV, params)
    return _kl(s.q, s.log_q, s.log_p) if reverse else _kl(s.p, s.log_p, s.log_q)


def forward_kl(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """KL(p || q) per row, fp32 ``[N]``. Finite input takes the memory-lean fused path."""
    return _kl_rows(student_logits_NV, target_logits_NV, params, reverse=False)


def reverse_kl(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """KL(q || p) per row, fp32 ``[N]``. Finite input takes the memory-lean fused path."""
    return _kl_rows(student_logits_NV, target_logits_NV, params, reverse=True)


def js(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """Generalised Jensen-Shannon: beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q; ``[N]``."""
    s = _Sides(student_logits_NV, target_logits_NV, params)
    beta = params.js_beta
    log_m = _mixture_log(beta, s.p, s.q, s.entry_ok)
    return beta * _kl(s.p, s.log_p, log_m) + (1.0 - beta) * _kl(s.q, s.log_q, log_m)


def skewed_forward_kl(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """KL(p || lam p + (1-lam) q) per row (DistiLLM's SKL), ``[N]``."""
    s = _Sides(student_logits_NV, target_logits_NV, params)
    log_mix = _mixture_log(params.skew_lambda, s.p, s.q, s.entry_ok)
    return _kl(s.p, s.log_p, log_mix)


def skewed_reverse_kl(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """KL(q || lam q + (1-lam) p) per row (DistiLLM's SRKL), ``[N]``."""
    s = _Sides(student_logits_NV, target_logits_NV, params)
    log_mix = _mixture_log(params.skew_lambda, s.q, s.p, s.entry_ok)
    return _kl(s.q, s.log_q, log_mix)


def adaptive_kl(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """Adaptive KL per row, ``[N]``.

    Target probabilities are sorted ascending; the *tail* is the prefix whose cumulative target mass is
    below ``akl_alpha``, the head is the rest. ``g_head``/``g_tail`` are the summed ``|p - q|`` gaps on each
    part (detached, as in the reference code). ``akl_alpha = 0`` gives forward KL, ``akl_alpha > 1`` reverse
    KL. When both gaps are 0 (p == q) the value is 0 instead of 0/0.
    """
    s = _Sides(student_logits_NV, target_logits_NV, params)
    with torch.no_grad():
        sorted_p, order = s.p.sort(-1)
        gap = (sorted_p - s.q.gather(-1, order)).abs()
        in_tail = sorted_p.cumsum(-1) < params.akl_alpha
        g_tail = (gap * in_tail).sum(-1)
        g_head = (gap * ~in_tail).sum(-1)
        total = (g_head + g_tail).clamp_min(torch.finfo(gap.dtype).tiny)
        w_head, w_tail = g_head / total, g_tail / total
    return w_head * _kl(s.p, s.log_p, s.log_q) + w_tail * _kl(s.q, s.log_q, s.log_p)


def total_variation(student_logits_NV: Tensor, target_logits_NV: Tensor, params: DivergenceParams) -> Tensor:
    """Total variation distance 1/2 sum |p - q| per row, ``[N]``."""
    s = _Sides(student_logits_NV, target_logits_NV, params)
    return 0.5 * (s.p - s.q).abs().sum(-1)


RowDivergence = Callable[[Tensor, Tensor, DivergenceParams], Tensor]

DIVERGENCES: dict[str, RowDivergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": js,
    "skewed_forward_kl": skewed_forward_kl,
    "skewed_reverse_kl": skewed_reverse_kl,
    "adaptive_kl": adaptive_kl,
    "total_variation": total_variation,
}


def resolve_divergence(name: str) -> RowDivergence:
    """Look a divergence up by name; the error lists the valid names."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}") from None


def divergence(
    name: str,
    student_logits_NV: Tensor,
    target_logits_NV: Tensor,
    *,
    mask_N: Tensor | None = None,
    params: DivergenceParams | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum a named divergence over the valid rows.

    Args:
        name: a key of ``DIVERGENCES``.
        student_logits_NV: trainable-side logits ``[N, V]``, any float dtype.
        target_logits_NV: target logits ``[N, V]``; the caller detaches them if they must not train.
        mask_N: bool ``[N]``, True on rows that count; ``None`` counts every row.
        params: temperature and divergence hyperparameters (defaults: ``DivergenceParams()``).

    Returns:
        ``(sum, count)``: fp32 (fp64 for fp64 input) scalar sum of the per-row values over valid rows, and
        the int64 scalar number of valid rows. All-masked input gives ``(0, 0)`` with no NaN.
    """
    row_fn = resolve_divergence(name)
    params = params or DivergenceParams()
    if mask_N is None:
        values_N = row_fn(student_logits_NV, target_logits_NV, params)
        return values_N.sum(), torch.tensor(values_N.shape[0], dtype=torch.long, device=values_N.device)
    mask_N = mask_N.to(torch.bool)
    keep_N1 = mask_N.unsqueeze(-1)
    # Zero excluded rows before any maths so their content (even all -inf) cannot leak NaN into the backward.
    student = torch.where(keep_N1, student_logits_NV, 0.0)
    target = torch.where(keep_N1, target_logits_NV, 0.0)
    values_N = row_fn(student, target, params)
    return torch.where(mask_N, values_N, 0.0).sum(), mask_N.sum()
