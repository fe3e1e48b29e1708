"""Float tolerances derived from the dtype and the length of the reductions being compared.

Two evaluations of the same quantity that differ only in summation order (chunked vs unchunked, another
CPU's vector width, a different kernel) each carry a rounding error of at most ``n * u * sum|x_i|`` for a
chain of ``n`` accumulations (Higham, "Accuracy and Stability of Numerical Algorithms", eq. 4.4, with the
unit roundoff ``u = eps / 2``). Their difference is therefore bounded by ``n * eps * scale`` where ``scale``
is the magnitude of the summed terms. Tests pass ``n`` as the total length of the reductions on the path
(matmul inner dimension + vocabulary softmax + row sum), so the bound follows the data, not the machine.
"""

from __future__ import annotations

import torch


def reduction_tolerance(dtype: torch.dtype, terms: int, *, scale: float = 1.0) -> dict[str, float]:
    """``rtol``/``atol`` keywords for ``torch.testing.assert_close`` after ``terms`` rounded accumulations.

    Args:
        dtype: the dtype the compared values were computed in (the lower one, when the sides differ).
        terms: total length of the reduction chain behind one compared value.
        scale: magnitude of the summed terms (``atol = rtol * scale``), for values that may cancel to ~0.
    """
    bound = terms * torch.finfo(dtype).eps
    return {"rtol": bound, "atol": bound * scale}


def approx_tolerance(dtype: torch.dtype, terms: int, *, scale: float = 1.0) -> dict[str, float]:
    """The same bound as ``pytest.approx`` keywords (``rel``/``abs``)."""
    tol = reduction_tolerance(dtype, terms, scale=scale)
    return {"rel": tol["rtol"], "abs": tol["atol"]}
