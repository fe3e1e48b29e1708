"""Projectors between the student and teacher hidden spaces, and their pseudo-inverse maths.

Shape legend: ``D`` student hidden, ``E`` teacher hidden, ``O`` overlap vocabulary (paired student and
teacher ids whose tokens stand for the same bytes, padded head rows excluded), ``N`` rows.

- ``T2SProjector``: trainable ``P``, ``h_t2s = P h_t`` (Linear E->D, no bias).
- ``ideal_t2s_init(W_s^O, W_t^O)``: ``P0 = pinv(W_s^O) W_t^O``, the least-squares solution of
  ``W_s^O P = W_t^O`` (projected-teacher logits equal teacher logits on O when representable).
- ``PinvS2TMap``: closed-form ``Q = pinv(W_t^O) sg(W_s^O)``, ``h_s2t = Q h_s``; rebuilt by the engine
  from the current student head once per optimizer step (``rebuild``); no trainable parameters.
- ``LearnedS2TMap``: trainable Linear D->E alternative. It owns parameters, so the engine must put it in
  the optimizer (the anchor code never did).

Every pseudo-inverse is computed in fp64 and its results are kept in fp32. Why fp64: ``torch.linalg.pinv``
drops singular values below ``eps * max(rows, cols)`` times the largest; in fp32 with ~150k overlap rows that
cut-off is ~2 % of the largest singular value, so real directions of the head would be discarded. In fp64
the cut-off is set by the input's own precision instead (``_pinv``). The SVD of an ``[O, D]`` matrix runs
once at start-up (fp64 needs ~3 copies of ``O x D`` doubles, e.g. 15 GB for 150k x 4096; seconds to
minutes). ``PinvS2TMap`` is a plain object, not an ``nn.Module``, so a bf16 engine cannot silently cast its matrices.
Functions here take full tensors; under ZeRO-3 the caller gathers the heads first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LearnedS2TMap", "PinvS2TMap", "T2SProjector", "ideal_t2s_init", "teacher_head_pinv"]


def _check_rows(student_rows_OD: Tensor, teacher_rows_OE: Tensor) -> None:
    if student_rows_OD.ndim != 2 or teacher_rows_OE.ndim != 2:
        raise ValueError("overlap head rows must be 2-D [O, hidden]")
    if student_rows_OD.shape[0] != teacher_rows_OE.shape[0]:
        raise ValueError(
            f"student overlap rows ({student_rows_OD.shape[0]}) and teacher overlap rows "
            f"({teacher_rows_OE.shape[0]}) must be paired one to one"
        )


def _pinv(rows_OH: Tensor) -> Tensor:
    """Moore-Penrose pseudo-inverse ``[H, O]`` computed in fp64.

    Cut-off: singular values below ``max(eps64 * max(O, H), eps(input dtype))`` times the largest are
    dropped. The first term is fp64's own numerical rank rule; the second is the input's storage precision:
    the rows are only known to a relative rounding of ``eps(dtype)``, so a direction weaker than that is
    rounding noise (Weyl: rounding moves every singular value by up to the rounding's norm), and inverting
    it would amplify noise by ``1 / sigma``. For fp32 heads this cuts at 1.2e-7 of the largest singular
    value instead of fp32 pinv's 1.8e-2 at 150k rows; for bf16 heads at 7.8e-3.
    """
    rows = rows_OH.detach()
    cutoff = max(torch.finfo(torch.float64).eps * max(rows.shape), torch.finfo(rows.dtype).eps)
    return torch.linalg.pinv(rows.to(torch.float64), rtol=cutoff)


def ideal_t2s_init(student_head_rows_OD: Tensor, teacher_head_rows_OE: Tensor) -> Tensor:
    """Least-squares t2s projector ``P0 = pinv(W_s^O) @ W_t^O``.

    Args:
        student_head_rows_OD: student head rows of the overlap ids ``[O, D]`` (``W_s[overlap_student_ids]``).
        teacher_head_rows_OE: teacher head rows of the same tokens, same order ``[O, E]``.

    Returns:
        fp32 ``[D, E]``, usable directly as ``T2SProjector.weight``; minimises ``||W_s^O P - W_t^O||_F``
        (minimum-norm solution when W_s^O is rank deficient).
    """
    _check_rows(student_head_rows_OD, teacher_head_rows_OE)
    return (_pinv(student_head_rows_OD) @ teacher_head_rows_OE.detach().to(torch.float64)).to(torch.float32)


def teacher_head_pinv(teacher_head_rows_OE: Tensor) -> Tensor:
    """``pinv(W_t^O)`` computed in fp64, kept as fp32 ``[E, O]``; computed once (the teacher head is frozen)."""
    if teacher_head_rows_OE.ndim != 2:
        raise ValueError("teacher overlap head rows must be 2-D [O, E]")
    return _pinv(teacher_head_rows_OE).to(torch.float32)


class T2SProjector(nn.Module):
    """Trainable teacher->student projector ``h_t2s_ND = h_t_NE @ P^T`` (no bias)."""

    def __init__(self, teacher_hidden: int, student_hidden: int):
        super().__init__()
        self.teacher_hidden = teacher_hidden
        self.student_hidden = student_hidden
        self.weight = nn.Parameter(torch.empty(student_hidden, teacher_hidden))
        nn.init.normal_(self.weight, std=teacher_hidden**-0.5)

    @torch.no_grad()
    def init_ideal_(self, student_head_rows_OD: Tensor, teacher_head_rows_OE: Tensor) -> T2SProjector:
        """Overwrite the weight with ``ideal_t2s_init`` (cast to the parameter's dtype); returns self."""
        initial = ideal_t2s_init(student_head_rows_OD, teacher_head_rows_OE)
        if initial.shape != self.weight.shape:
            raise ValueError(
                f"ideal init has shape {tuple(initial.shape)}, projector weight is {tuple(self.weight.shape)}"
            )
        self.weight.copy_(initial.to(self.weight.device, self.weight.dtype))
        return self

    def forward(self, teacher_hidden_NE: Tensor) -> Tensor:
        """``[N, E]`` -> ``[N, D]`` in the parameter's dtype."""
        return F.linear(teacher_hidden_NE.to(self.weight.dtype), self.weight)


class PinvS2TMap:
    """Closed-form student->teacher map ``Q = pinv(W_t^O) @ sg(W_s^O)`` ``[E, D]``, kept in fp32.

    The pinv of the teacher rows is computed once at construction. ``rebuild(student_head_weight)`` forms
    ``Q`` from the current student head (call it once per optimizer step, inside a ZeRO-3 gather); calling
    the map applies ``h_s2t = Q h_s``. The result never carries gradient to the student head, only to
    ``h_s``. Before the first ``rebuild`` the map refuses to run.
    """

    def __init__(self, teacher_head_rows_OE: Tensor, overlap_student_ids_O: Tensor):
        if overlap_student_ids_O.ndim != 1 or overlap_student_ids_O.shape[0] != teacher_head_rows_OE.shape[0]:
            raise ValueError(
                f"overlap_student_ids must be [O] with O = {teacher_head_rows_OE.shape[0]} teacher rows, "
                f"got shape {tuple(overlap_student_ids_O.shape)}"
            )
        self.pinv_EO = teacher_head_pinv(teacher_head_rows_OE)
        self.overlap_student_ids_O = overlap_student_ids_O.to(self.pinv_EO.device, torch.long)
        self.matrix_ED: Tensor | None = None

    def to(self, device: torch.device | str) -> PinvS2TMap:
        """Move the stored matrices (staying fp32)."""
        self.pinv_EO = self.pinv_EO.to(device)
        self.overlap_student_ids_O = self.overlap_student_ids_O.to(device)
        if self.matrix_ED is not None:
            self.matrix_ED = self.matrix_ED.to(device)
        return self

    @torch.no_grad()
    def rebuild(self, student_head_weight_VD: Tensor) -> None:
        """Recompute ``Q`` from the full student head weight ``[V_s(padded), D]`` (detached, fp32)."""
        ids = self.overlap_student_ids_O.to(student_head_weight_VD.device)
        if int(ids.max()) >= student_head_weight_VD.shape[0]:
            raise ValueError(
                f"overlap student id {int(ids.max())} is outside the student head "
                f"({student_head_weight_VD.shape[0]} rows)"
            )
        rows_OD = student_head_weight_VD.detach()[ids].to(torch.float32)
        self.matrix_ED = self.pinv_EO.to(rows_OD.device) @ rows_OD

    def __call__(self, student_hidden_ND: Tensor) -> Tensor:
        """``[N, D]`` -> ``[N, E]``, computed in fp32 and returned in the input's dtype."""
        if self.matrix_ED is None:
            raise RuntimeError("PinvS2TMap.rebuild(student_head_weight) must be called before the map is applied")
        mapped = F.linear(student_hidden_ND.to(torch.float32), self.matrix_ED.to(student_hidden_ND.device))
        return mapped.to(student_hidden_ND.dtype)


class LearnedS2TMap(nn.Module):
    """Trainable student->teacher projector ``h_s2t_NE = h_s_ND @ W^T`` (no bias); needs an optimizer group."""

    def __init__(self, student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(teacher_hidden, student_hidden))
        nn.init.normal_(self.weight, std=student_hidden**-0.5)

    @torch.no_grad()
    def init_pinv_(self, student_head_rows_OD: Tensor, teacher_head_rows_OE: Tensor) -> LearnedS2TMap:
        """Start from the closed-form ``pinv(W_t^O) W_s^O`` (fp64 maths); returns self."""
        _check_rows(student_head_rows_OD, teacher_head_rows_OE)
        initial = _pinv(teacher_head_rows_OE) @ student_head_rows_OD.detach().to(torch.float64)
        self.weight.copy_(initial.to(self.weight.device, self.weight.dtype))
        return self

    def forward(self, student_hidden_ND: Tensor) -> Tensor:
        """``[N, D]`` -> ``[N, E]`` in the parameter's dtype."""
        return F.linear(student_hidden_ND.to(self.weight.dtype), self.weight)
