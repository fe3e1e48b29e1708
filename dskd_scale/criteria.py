"""Criterion dispatch: a Contract 2 batch + last hidden states -> ``{term: (sum, count)}`` for ``combine_terms``.

Shape legend: ``B`` batch, ``S``/``T`` student/teacher positions, ``D``/``E`` hidden sizes, ``N`` label rows,
``A`` aligned rows.

Rows are gathered with one vectorised index each: label rows ``h[b, s-1]`` predict ``labels[b, s]``; aligned
rows ``h_s[align_batch, align_student-1]`` and ``h_t[align_batch, align_teacher-1]`` predict the same token
(design.md Contract 1). Losses never see padding or the sequence layout.

- ``sft``: student CE on gold labels.
- ``vanilla_kd``: ``(1-a)·CE + a·D(teacher, student)`` on aligned rows (same vocabulary).
- ``dskd`` (same vocabulary) / ``dskd_eta`` (prealigned ETA rows, vocabulary map): ``dskd_loss``.
- ``dskd_cma``, ``uld``, ``mined``: the baselines in ``dskd_scale.losses.baselines``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dskd_scale.config.run import KDConfig
from dskd_scale.losses import (
    DSKDOptions,
    baselines,
    combine_terms,
    data_counts,
    dskd_loss,
    official_local_counts,
    student_ce,
    term_weights,
)

IGNORE_INDEX = -100
_DSKD_V2 = ("dskd", "dskd_eta")


@dataclass
class Rows:
    """Flat row indices of one micro-batch, computed once from the batch (no model needed)."""

    label_batch_N: Tensor
    label_pos_N: Tensor  # position of the hidden state that predicts the label (s - 1)
    labels_N: Tensor
    align_batch_A: Tensor
    align_student_A: Tensor  # s - 1
    align_teacher_A: Tensor  # t - 1
    aligned_labels_A: Tensor  # the student token each aligned row predicts

    @property
    def fused_ce(self) -> bool:
        """True when the aligned rows are exactly the label rows (same-vocabulary identity alignment)."""
        return (self.labels_N.numel() == self.align_batch_A.numel()
                and torch.equal(self.label_batch_N, self.align_batch_A)
                and torch.equal(self.label_pos_N, self.align_student_A))


def batch_rows(batch: dict[str, Tensor]) -> Rows:
    """Label rows from ``student_labels [B,S]`` (not shifted: labels[s] is predicted at s-1) and aligned rows."""
    labels_BS = batch["student_labels"]
    label_batch_N, label_at_N = torch.nonzero(labels_BS[:, 1:] != IGNORE_INDEX, as_tuple=True)
    align_batch_A = batch["align_batch"]
    align_student = batch["align_student"]
    return Rows(
        label_batch_N=label_batch_N,
        label_pos_N=label_at_N,
        labels_N=labels_BS[label_batch_N, label_at_N + 1],
        align_batch_A=align_batch_A,
        align_student_A=align_student - 1,
        align_teacher_A=batch["align_teacher"] - 1,
        aligned_labels_A=batch["student_input_ids"][align_batch_A, align_student],
    )


def local_counts(kd: KDConfig, rows: Rows, batch: dict[str, Tensor]) -> dict[str, Tensor | int]:
    """This micro-batch's denominators (all known before any forward); summed over ranks and the GA window."""
    if kd.criterion in _DSKD_V2:
        return data_counts(int(rows.labels_N.numel()), int(rows.align_batch_A.numel()))
    return baselines.local_counts(kd.criterion, batch)


def dskd_options(kd: KDConfig, *, agreement_mask: bool) -> DSKDOptions:
    # The official ETA code copies hidden states (s2t rows, unmasked t2s rows) only where the teacher's
    # prediction maps into the student vocabulary; the official normalisation reproduces that row set too.
    official_eta = kd.normalization == "official" and kd.criterion == "dskd_eta"
    return DSKDOptions(divergence=kd.divergence, temperature=kd.temperature, skew_lambda=kd.skew_lambda,
                       akl_alpha=kd.adaptive_kl_alpha, spaces=kd.spaces, agreement_mask=agreement_mask,
                       mapped_rows_only=official_eta, chunk_size=kd.chunk_size)


def head_grad_weights(kd: KDConfig, global_counts: dict[str, float], *, world_size: int,
                      grad_accum_steps: int) -> dict[str, float]:
    """What ``combine`` will weight each term sum by (``reduce.term_weights``), known before the forward.

    Passed to ``compute_terms`` so the fused student head accumulates its weight gradient already weighted
    and skips recomputation in the backward; locally normalised (official) terms are left out.
    """
    if kd.criterion == "sft":
        return term_weights(global_counts, alpha=0.0, world_size=world_size, grad_accum_steps=grad_accum_steps)
    if kd.criterion == "dskd_cma":  # its student-head terms run through autograd, not the fused head
        return {}
    if kd.criterion not in _DSKD_V2:  # combine puts the baseline's KD terms under alpha, each over its count
        return term_weights(global_counts, alpha=kd.alpha, world_size=world_size, grad_accum_steps=grad_accum_steps,
                            kd_terms=baselines.KD_TERMS[kd.criterion])
    local = ("kd_t2s", "ce_t2s", "kd_s2t") if kd.normalization == "official" else ()
    return term_weights(global_counts, alpha=kd.alpha, world_size=world_size, grad_accum_steps=grad_accum_steps,
                        spaces=kd.spaces, local_terms=local)


def compute_terms(kd: KDConfig, rows: Rows, student_hidden_BSD: Tensor, teacher_hidden_BTE: Tensor | None,
                  engines: Any, *, agreement_mask: bool = True, batch: dict[str, Tensor] | None = None,
                  head_grad_weights: dict[str, float] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """The criterion's ``{name: (sum, count)}`` terms (and metric hit counts) for one micro-batch.

    Args:
        kd: the ``kd`` config section (criterion, divergence, temperature, chunk size).
        rows: ``batch_rows(batch)``.
        student_hidden_BSD: student last hidden states (grad flows).
        teacher_hidden_BTE: teacher last hidden states (no grad); None for ``sft``, and with a teacher cache,
            whose rows at the aligned positions come in ``batch["teacher_hidden_rows"]`` (``[A, E]``).
        engines: ``dskd_scale.engine.build.Engines`` (heads, projectors, id map).
        agreement_mask: this step's t2s agreement-mask switch (``use_t2s_agreement_mask``).
        batch: the micro-batch itself (the sequence-level baselines need it).
        head_grad_weights: ``head_grad_weights(...)`` of this step (optional; only saves recomputation).
    """
    weights = head_grad_weights or {}
    student_head = engines.trainable_student_head()
    criterion = kd.criterion
    if criterion == "sft":  # B2's sft_loss is the same student_ce call
        hidden_ND = student_hidden_BSD[rows.label_batch_N, rows.label_pos_N]
        return {"ce": student_ce(hidden_ND, rows.labels_N, student_head, chunk_size=kd.chunk_size,
                                 grad_weight=weights.get("ce", 0.0))}

    student_AD = student_hidden_BSD[rows.align_batch_A, rows.align_student_A]
    if batch is not None and "teacher_hidden_rows" in batch:  # teacher.cache_dir: the rows came with the batch
        # In the run's precision, as the live teacher's hidden states would be (exact for a bf16 cache in bf16).
        teacher_AE = batch["teacher_hidden_rows"].to(student_hidden_BSD.dtype)
    else:
        teacher_AE = teacher_hidden_BTE[rows.align_batch_A, rows.align_teacher_A]
    if criterion in _DSKD_V2:
        fused = rows.fused_ce
        terms = dskd_loss(
            student_AD, teacher_AE,
            student_head=student_head, student_head_frozen=engines.student_head.frozen_head(),
            teacher_head=engines.teacher_head, t2s_projector=engines.student_module.t2s_projector,
            s2t_map=engines.s2t_map, teacher_to_student_ids=engines.teacher_to_student_ids,
            options=dskd_options(kd, agreement_mask=agreement_mask),
            student_labels_A=rows.aligned_labels_A if fused else None, head_grad_weights=weights)
        if not fused:  # ETA: gold CE runs over every label row, not only the aligned ones
            hidden_ND = student_hidden_BSD[rows.label_batch_N, rows.label_pos_N]
            terms["ce"] = student_ce(hidden_ND, rows.labels_N, student_head, chunk_size=kd.chunk_size,
                                     grad_weight=weights.get("ce", 0.0))
        return terms
    resources = engines.baseline_resources
    if criterion == "dskd_cma":  # this step's frozen student head and index embeddings
        embedding = engines.student_head.embedding_VF
        resources = dataclasses.replace(resources, student_head_frozen=engines.student_head.frozen_head(),
                                        cma_projectors=engines.student_module.cma_projectors,
                                        student_embed=lambda ids: F.embedding(ids, embedding))
    return baselines.criterion_terms(
        criterion, kd=kd, rows=rows, student_hidden_BSD=student_hidden_BSD, teacher_hidden_BTE=teacher_hidden_BTE,
        student_AD=student_AD, teacher_AE=teacher_AE, student_head=student_head, teacher_head=engines.teacher_head,
        batch=batch, resources=resources, head_grad_weights=weights)


def combine(kd: KDConfig, terms: dict[str, tuple[Tensor, Tensor]], global_counts: dict[str, float], *,
            world_size: int, grad_accum_steps: int, agreement_mask: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The scalar to backpropagate: ``(1-a)·CE + a·sum(KD terms)``, each term over its GLOBAL count.

    DSKD v2 uses ``combine_terms`` with ``kd.spaces``; with ``kd.normalization=official`` the terms the
    official code normalises locally use this micro-batch's counts (``official_local_counts``; pass the
    step's ``agreement_mask``, the same switch ``compute_terms`` got). The baselines name their KD terms
    differently (``kd``), which ``combine_terms`` does not know, so their KD terms are passed under alpha
    through the same function by combining CE alone (alpha=0) and adding ``alpha`` times the KD means with
    the same rank/GA compensation.
    """
    alpha = 0.0 if kd.criterion == "sft" else kd.alpha
    if kd.criterion in _DSKD_V2:
        local = None
        if kd.normalization == "official":
            local = official_local_counts(terms, eta=kd.criterion == "dskd_eta", agreement_mask=agreement_mask)
        return combine_terms(terms, global_counts, alpha=alpha, world_size=world_size,
                             grad_accum_steps=grad_accum_steps, spaces=kd.spaces, local_counts=local)
    loss, metrics = combine_terms(terms, global_counts, alpha=0.0, world_size=world_size,
                                  grad_accum_steps=grad_accum_steps)
    loss = loss * (1.0 - alpha)
    total = metrics["loss"] * (1.0 - alpha)
    for name in baselines.KD_TERMS[kd.criterion]:
        mean = terms[name][0].float() / max(float(global_counts[name]), 1.0)
        loss = loss + alpha * mean * (world_size * grad_accum_steps)
        total = total + alpha * mean.detach()
    metrics["loss"] = total
    return loss, metrics
