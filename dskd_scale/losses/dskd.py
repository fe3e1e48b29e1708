"""Dual-Space Knowledge Distillation v2 terms over flat aligned rows, computed in token chunks.

Shape legend: ``A`` aligned rows, ``C`` rows of one chunk, ``D`` student hidden, ``E`` teacher hidden,
``V`` student vocabulary (head rows), ``W`` teacher vocabulary (head rows).

Row ``a`` pairs the student hidden state and the teacher hidden state that *predict the same token*
(same-vocabulary DSKD: every response position with an identity id map; ETA: the offline alignment).
Per row, with ``z_t = W_t h_t`` and ``y_t = argmax z_t`` mapped into the student vocabulary (``-1`` when
the teacher token has no student counterpart or lies beyond the map, e.g. a padded teacher head row):

- ``ce_t2s``: CE(sg(W_s) P h_t, y_t) over rows with a mapped label; trains only ``P``.
- ``kd_t2s``: D(student = W_s h_s, target = sg(sg(W_s) P h_t)); the student trains, ``P`` does not. With
  ``agreement_mask`` only rows where argmax(sg(W_s) P h_t) == y_t count (paper, anchor section 1.4 item 4).
- ``kd_s2t``: D(student = W_t Q h_s, target = z_t) over every aligned row (the mapping is not needed);
  the teacher head is frozen; gradient reaches ``h_s`` (and a learned ``Q`` if one is used).
- ``ce`` (optional, when ``student_labels_A`` is given): the student's CE on gold labels, fused here so the
  student logits are formed once for both ``ce`` and ``kd_t2s``.

Normalisation (documented deviation from the anchor, whose masked branch divides by a *local* count of
agreeing rows): every t2s/s2t term returns ``count = A``, the number of aligned rows, which the engine
knows from the data before any forward. Rows removed by forward-dependent masks (disagreement, unmapped
teacher argmax) contribute zero to the sum. The sum over ranks and micro-batches divided by the global
``A`` is then an exact token mean, identical however the window is split. The paper's threshold decides
*whether* the mask applies; ``reduce.use_t2s_agreement_mask`` turns it into a per-optimizer-step switch
computed from the previous step's global agreement ratio, passed here as ``options.agreement_mask``.
The official code's local normalisation (``kd.normalization=official``) is applied by
``reduce.combine_terms`` from the local hit counts returned here (``t2s_agreement``, ``t2s_label_coverage``).

No ``[A, V]`` or ``[A, W]`` tensor exists beyond one chunk: frozen-head terms (``ce_t2s``, ``kd_s2t``)
store only their ``[C, D]``/``[C, E]`` input gradient; the student-head terms add their weight gradient to
the ``TrainableHead``'s one accumulator in the forward (or, for a plain head callable, recompute the chunk
in the backward).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from dskd_scale.losses.chunked import (
    HeadFn,
    TrainableHead,
    eager_head_grad,
    fused_head_chunk,
    recomputed_chunk,
    split_rows,
)
from dskd_scale.losses.divergences import DivergenceParams, RowDivergence, at_least_fp32, resolve_divergence

__all__ = ["LOSS_TERMS", "DSKDOptions", "dskd_loss", "map_teacher_ids"]

LOSS_TERMS = ("ce", "kd_t2s", "ce_t2s", "kd_s2t")
SPACES = ("both", "student", "teacher")


@dataclass(frozen=True, slots=True, kw_only=True)
class DSKDOptions:
    """Settings of ``dskd_loss``.

    Attributes:
        divergence: a key of ``DIVERGENCES``, used in both spaces.
        temperature, skew_lambda, js_beta, akl_alpha: divergence hyperparameters (``DivergenceParams``).
        spaces: "both", "student" (kd_t2s + ce_t2s only) or "teacher" (kd_s2t only).
        agreement_mask: restrict kd_t2s to rows whose projected argmax equals the mapped teacher argmax.
        mapped_rows_only: restrict kd_s2t (and an unmasked kd_t2s) to rows whose teacher argmax maps into
            the student vocabulary, as the official ETA code does (it copies hidden states only for those
            rows, anchor section 2.3); ``kd.normalization=official`` sets it for ``dskd_eta``.
        chunk_size: aligned rows per chunk (bounds the ``[C, V]`` memory).
        ignore_index: label value ignored by the fused student CE.
    """

    divergence: str = "forward_kl"
    temperature: float = 1.0
    skew_lambda: float = 0.1
    js_beta: float = 0.5
    akl_alpha: float = 0.5
    spaces: str = "both"
    agreement_mask: bool = True
    mapped_rows_only: bool = False
    chunk_size: int = 256
    ignore_index: int = -100

    def divergence_params(self) -> DivergenceParams:
        return DivergenceParams(
            temperature=self.temperature, skew_lambda=self.skew_lambda, js_beta=self.js_beta, akl_alpha=self.akl_alpha
        )

    def problems(self) -> list[str]:
        """Human-readable problems with the settings (empty when valid)."""
        found = list(self.divergence_params().problems())
        try:
            resolve_divergence(self.divergence)
        except ValueError as error:
            found.append(str(error))
        if self.spaces not in SPACES:
            found.append(f"spaces must be one of {SPACES}, got {self.spaces!r}")
        if self.chunk_size <= 0:
            found.append(f"chunk_size must be > 0, got {self.chunk_size}")
        return found


def map_teacher_ids(teacher_ids_N: Tensor, teacher_to_student_ids: Tensor) -> Tensor:
    """Map teacher token ids into the student vocabulary; ``-1`` for ids with no counterpart.

    Ids beyond the map (padded teacher head rows, e.g. 152064-row Qwen2.5-7B head vs a 151646-token
    tokenizer) and ids the map sends to ``-1`` both give ``-1``: ignored, never an EOS/unk label.
    """
    size = teacher_to_student_ids.shape[0]
    inside = teacher_ids_N < size
    looked_up = teacher_to_student_ids[teacher_ids_N.clamp(0, max(size - 1, 0))]
    return torch.where(inside, looked_up, torch.full_like(looked_up, -1))


def _s2t_terms(
    logits_CW: Tensor,
    teacher_logits_CW: Tensor,
    teacher_pred_C: Tensor,
    rows_used_C: Tensor | None,
    *,
    row_divergence: RowDivergence,
    params: DivergenceParams,
) -> tuple[Tensor, Tensor]:
    """kd_s2t from the teacher-head logits of the mapped student rows (+ argmax hits)."""
    rows_C = row_divergence(logits_CW, teacher_logits_CW, params)
    loss_sum = (rows_C if rows_used_C is None else torch.where(rows_used_C, rows_C, 0.0)).sum()
    return loss_sum, (logits_CW.argmax(-1) == teacher_pred_C).sum()


def _t2s_ce_terms(logits_CV: Tensor, mapped_label_C: Tensor) -> tuple[Tensor, Tensor]:
    """ce_t2s from the frozen student-head logits of the projected teacher rows (+ their argmax)."""
    if mapped_label_C.numel() and int(mapped_label_C.max()) >= logits_CV.shape[-1]:
        raise ValueError(
            f"teacher_to_student_ids maps to student id {int(mapped_label_C.max())}, but the student head has "
            f"only {logits_CV.shape[-1]} rows"
        )
    ce_sum = F.cross_entropy(at_least_fp32(logits_CV), mapped_label_C, ignore_index=-1, reduction="sum")
    return ce_sum, logits_CV.argmax(-1)


def _student_terms(
    logits_CV: Tensor,
    projected_teacher_CD: Tensor | None,
    kd_mask_C: Tensor | None,
    labels_C: Tensor | None,
    mapped_label_C: Tensor,
    target_logits_CV: Tensor | None = None,
    *,
    student_head_frozen: HeadFn,
    row_divergence: RowDivergence,
    params: DivergenceParams,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """kd_t2s and the fused CE from the student logits of one chunk (+ argmax hits)."""
    zero = logits_CV.new_zeros((), dtype=torch.float32)
    kd_sum = zero
    if projected_teacher_CD is not None:
        if target_logits_CV is None:  # recomputation in the backward: rebuild the detached target
            with torch.no_grad():
                target_logits_CV = student_head_frozen(projected_teacher_CD)
        rows_C = row_divergence(logits_CV, target_logits_CV, params)
        kd_sum = torch.where(kd_mask_C, rows_C, 0.0).sum()
    ce_sum = zero
    if labels_C is not None:
        ce_sum = F.cross_entropy(at_least_fp32(logits_CV), labels_C, ignore_index=ignore_index, reduction="sum")
    return kd_sum, ce_sum, (logits_CV.argmax(-1) == mapped_label_C).sum()


def _student_chunk(student_hidden_CD: Tensor, *rows: Tensor | None, student_head: HeadFn, **kw) -> tuple[Tensor, ...]:
    """``_student_terms`` of a plain head callable (autograd path)."""
    return _student_terms(student_head(student_hidden_CD), *rows, **kw)


def dskd_loss(
    student_hidden_AD: Tensor,
    teacher_hidden_AE: Tensor,
    *,
    student_head: HeadFn,
    student_head_frozen: HeadFn,
    teacher_head: HeadFn,
    t2s_projector: HeadFn | None,
    s2t_map: HeadFn | None,
    teacher_to_student_ids: Tensor,
    options: DSKDOptions,
    student_labels_A: Tensor | None = None,
    head_grad_weights: Mapping[str, float] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """DSKD v2 terms as ``{name: (sum, count)}`` over aligned rows.

    Args:
        student_hidden_AD: student last hidden states at the rows predicting aligned tokens (grad flows).
        teacher_hidden_AE: teacher last hidden states at the paired rows (detached here).
        student_head: trainable student head: a ``TrainableHead`` (its weight gradient is accumulated in the
            forward into one buffer, see ``chunked.fused_head_chunk``) or any callable ``[C, D] -> [C, V]``
            (e.g. a module call under ZeRO-3; the chunk is recomputed in the backward).
        student_head_frozen: the same head without gradient to its weight (e.g. ``F.linear`` on a
            detached/gathered copy); gradient still flows to its input.
        teacher_head: frozen teacher head ``[C, E] -> [C, W]``.
        t2s_projector: ``[A, E] -> [A, D]`` (``T2SProjector``); may be ``None`` when ``spaces == "teacher"``.
        s2t_map: ``[A, D] -> [A, E]`` (``PinvS2TMap`` or ``LearnedS2TMap``); ``None`` allowed when
            ``spaces == "student"``.
        teacher_to_student_ids: int64 ``[len(teacher tokenizer)]``, ``-1`` where no student token matches.
        options: ``DSKDOptions``.
        student_labels_A: optional gold next-token ids of the student rows (``ignore_index`` to skip);
            when given, the student CE is returned as ``"ce"``.
        head_grad_weights: expected ``d loss / d sum`` of ``kd_t2s`` and ``ce`` (``reduce.term_weights``),
            up to a common factor; only used by a ``TrainableHead`` to skip recomputation. A missing term
            reads 0 (unknown or unused: exact, the chunk is recomputed in the backward if it is used).

    Returns:
        ``kd_t2s``, ``ce_t2s``, ``kd_s2t`` (count = A; a term outside ``options.spaces`` is a zero sum),
        ``ce`` when labels are given (count = non-ignored labels), and metrics ``t2s_agreement``,
        ``t2s_label_coverage``, ``s2t_acc``, ``student_teacher_agreement`` as (hits, A) (a metric whose
        logits were not formed, e.g. ``s2t_acc`` with ``spaces == "student"``, reads 0 hits).
    """
    problems = options.problems()
    if problems:
        raise ValueError("invalid DSKDOptions: " + "; ".join(problems))
    rows = student_hidden_AD.shape[0]
    if teacher_hidden_AE.shape[0] != rows:
        raise ValueError(f"{rows} student rows but {teacher_hidden_AE.shape[0]} teacher rows; they must be paired")
    if student_labels_A is not None and student_labels_A.shape != (rows,):
        raise ValueError(f"student_labels_A must have shape ({rows},), got {tuple(student_labels_A.shape)}")
    use_student_space = options.spaces in ("both", "student")
    use_teacher_space = options.spaces in ("both", "teacher")
    if use_student_space and t2s_projector is None:
        raise ValueError("spaces includes the student space but t2s_projector is None")
    if use_teacher_space and s2t_map is None:
        raise ValueError("spaces includes the teacher space but s2t_map is None")

    params = options.divergence_params()
    row_divergence = resolve_divergence(options.divergence)
    weights = dict(head_grad_weights or {})
    device = student_hidden_AD.device
    id_map = teacher_to_student_ids.to(device=device, dtype=torch.long)
    teacher_hidden_AE = teacher_hidden_AE.detach()
    projected_teacher_AD = t2s_projector(teacher_hidden_AE) if use_student_space else None
    mapped_student_AE = s2t_map(student_hidden_AD) if use_teacher_space else None

    names = (
        "kd_t2s",
        "ce_t2s",
        "kd_s2t",
        "ce",
        "t2s_agreement",
        "t2s_label_coverage",
        "s2t_acc",
        "student_teacher_agreement",
    )
    sums: dict[str, Tensor] = {name: student_hidden_AD.new_zeros((), dtype=torch.float32) for name in names}
    # Keep every loss attached to the graph even when a term is switched off or A == 0.
    graph_zero = student_hidden_AD.sum().float() * 0.0
    for name in LOSS_TERMS:
        sums[name] = sums[name] + graph_zero

    chunks = split_rows(
        [student_hidden_AD, teacher_hidden_AE, projected_teacher_AD, mapped_student_AE, student_labels_A],
        options.chunk_size,
    )
    for student_h, teacher_h, projected_t, mapped_s, labels in chunks:
        with torch.no_grad():
            teacher_logits_CW = teacher_head(teacher_h)
            teacher_pred_C = teacher_logits_CW.argmax(-1)
            mapped_label_C = map_teacher_ids(teacher_pred_C, id_map)
        sums["t2s_label_coverage"] += (mapped_label_C >= 0).sum()
        if use_teacher_space:
            s2t_fn = partial(_s2t_terms, row_divergence=row_divergence, params=params)
            s2t_rows_C = mapped_label_C >= 0 if options.mapped_rows_only else None
            kd_s2t, s2t_hits = eager_head_grad(
                s2t_fn, teacher_head, mapped_s, teacher_logits_CW, teacher_pred_C, s2t_rows_C
            )
            sums["kd_s2t"] = sums["kd_s2t"] + kd_s2t
            sums["s2t_acc"] += s2t_hits
        del teacher_logits_CW

        target_logits_CV, kd_mask_C = None, None
        if use_student_space:
            ce_t2s, t2s_pred_C, target_logits_CV = eager_head_grad(
                _t2s_ce_terms, student_head_frozen, projected_t, mapped_label_C, keep_logits=True
            )
            agree_C = (t2s_pred_C == mapped_label_C) & (mapped_label_C >= 0)
            if options.agreement_mask:
                kd_mask_C = agree_C
            else:
                kd_mask_C = mapped_label_C >= 0 if options.mapped_rows_only else torch.ones_like(agree_C)
            sums["ce_t2s"] = sums["ce_t2s"] + ce_t2s
            sums["t2s_agreement"] += agree_C.sum()
            projected_t = projected_t.detach()
        else:
            projected_t = None
        if projected_t is None and labels is None:
            continue  # teacher space only, no fused CE: the student head is not needed
        chunk_rows = (projected_t, kd_mask_C, labels, mapped_label_C)
        terms_kw = dict(
            student_head_frozen=student_head_frozen,
            row_divergence=row_divergence,
            params=params,
            ignore_index=options.ignore_index,
        )
        if isinstance(student_head, TrainableHead):
            kd_t2s, ce, hits = fused_head_chunk(
                partial(_student_terms, **terms_kw),
                student_head,
                student_h,
                *chunk_rows,
                expected_weights=(weights.get("kd_t2s", 0.0), weights.get("ce", 0.0)),
                first_pass_rows=(target_logits_CV,),
            )
        else:
            student_fn = partial(_student_chunk, student_head=student_head, **terms_kw)
            kd_t2s, ce, hits = recomputed_chunk(
                partial(student_fn, target_logits_CV=None),
                student_h,
                *chunk_rows,
                first_pass_fn=partial(student_fn, target_logits_CV=target_logits_CV),
                num_losses=2,
            )
        del target_logits_CV
        sums["kd_t2s"] = sums["kd_t2s"] + kd_t2s
        sums["ce"] = sums["ce"] + ce
        sums["student_teacher_agreement"] += hits

    aligned = torch.tensor(rows, dtype=torch.long, device=device)
    result = {name: (sums[name], aligned) for name in names if name != "ce"}
    if student_labels_A is not None:
        result["ce"] = (sums["ce"], (student_labels_A != options.ignore_index).sum())
    return result
