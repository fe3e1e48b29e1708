"""Baseline criteria for the training loop: loss terms and their pre-forward counts from a Contract 2 batch.

Shape legend: ``B`` batch, ``S``/``T`` positions, ``D``/``E`` hidden sizes, ``N`` label rows, ``A`` aligned rows.

``criterion_terms`` is what ``dskd_scale.criteria.compute_terms`` calls for ``vanilla_kd``, ``uld``, ``mined`` and
``dskd_cma`` (and ``sft``); ``local_counts`` gives the denominators of the same terms, all known from the batch
before any forward, to be summed over ranks and the accumulation window; ``KD_TERMS`` names the terms that
``combine_terms`` must put under ``alpha`` (``(1 - alpha) * ce + alpha * sum(KD_TERMS[criterion])``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dskd_scale.alignment.mined import MinedMap
from dskd_scale.losses.baselines.cma import EmbedFn, cma_loss, cma_row_counts
from dskd_scale.losses.baselines.mined import mined_kd_loss, mined_teacher_rows
from dskd_scale.losses.baselines.uld import uld_loss, uld_pairs
from dskd_scale.losses.baselines.vanilla import check_same_vocabulary, vanilla_kd_loss
from dskd_scale.losses.ce import student_ce
from dskd_scale.losses.chunked import HeadFn
from dskd_scale.losses.divergences import DivergenceParams

__all__ = ["BASELINES", "KD_TERMS", "BaselineResources", "criterion_terms", "local_counts"]

IGNORE_INDEX = -100
KD_TERMS = {
    "sft": (),
    "vanilla_kd": ("kd",),
    "uld": ("kd",),
    "mined": ("kd",),
    "dskd_cma": ("kd_t2s", "ce_t2s", "kd_s2t"),
}
BASELINES = tuple(KD_TERMS)


@dataclass
class BaselineResources:
    """What the baselines need beyond hidden states and heads, built once by the engine.

    Attributes:
        student_vocab_size, teacher_vocab_size: ``len(tokenizer)`` of each side (head rows past them are padding).
        mined: the MinED map (``alignment.mined.load_mined_map``), for ``mined``.
        cma_projectors: ``build_cma_projectors(...)`` registered in the student engine, for ``dskd_cma``.
        student_embed, teacher_embed: input-embedding lookups ``ids -> [B, L, F]``, for ``dskd_cma``.
        student_head_frozen: the student head without weight gradient, for ``dskd_cma``.
    """

    student_vocab_size: int
    teacher_vocab_size: int
    mined: MinedMap | None = None
    cma_projectors: nn.ModuleDict | None = None
    student_embed: EmbedFn | None = None
    teacher_embed: EmbedFn | None = None
    student_head_frozen: HeadFn | None = None

    def require(self, criterion: str, *names: str) -> None:
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            raise ValueError(f"kd.criterion {criterion!r} needs BaselineResources.{', '.join(missing)} from the engine")


def _label_rows(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    labels_BS = batch["student_labels"]
    label_batch_N, label_pos_N = torch.nonzero(labels_BS[:, 1:] != IGNORE_INDEX, as_tuple=True)
    return label_batch_N, label_pos_N, labels_BS[label_batch_N, label_pos_N + 1]


def local_counts(criterion: str, batch: dict[str, Tensor]) -> dict[str, int]:
    """This micro-batch's denominators of every term ``criterion_terms`` returns (metrics included)."""
    labels = int((batch["student_labels"][:, 1:] != IGNORE_INDEX).sum())
    counts = {"ce": labels}
    if criterion == "vanilla_kd":
        aligned = int(batch["align_student"].numel())
        counts.update(kd=aligned, student_teacher_agreement=aligned)
    elif criterion == "uld":
        counts["kd"] = int(uld_pairs(batch["student_labels"], batch["teacher_labels"])[0].numel())
    elif criterion == "mined":
        counts.update(kd=labels, mined_aligned=labels)
    elif criterion == "dskd_cma":
        n, m = cma_row_counts(batch["student_labels"], batch["teacher_labels"])
        counts.update(kd_t2s=n, ce_t2s=n, t2s_acc=n, kd_s2t=m, s2t_acc=m)
    elif criterion != "sft":
        raise ValueError(f"unknown baseline criterion {criterion!r}; choose one of {BASELINES}")
    return counts


def criterion_terms(
    criterion: str,
    *,
    kd: Any,
    rows: Any,
    student_hidden_BSD: Tensor,
    teacher_hidden_BTE: Tensor | None,
    student_AD: Tensor | None,
    teacher_AE: Tensor | None,
    student_head: HeadFn,
    teacher_head: HeadFn | None,
    batch: dict[str, Tensor],
    resources: BaselineResources | None = None,
    head_grad_weights: dict[str, float] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"ce": ..., <KD_TERMS[criterion]>: ..., metrics}`` as ``(sum, count)`` for one micro-batch.

    Args:
        criterion: one of ``BASELINES``.
        kd: the ``kd`` config section (``divergence``, ``temperature``, ``skew_lambda``, ``adaptive_kl_alpha``,
            ``chunk_size``).
        rows: ``criteria.batch_rows(batch)`` (label and aligned rows; only read for ``vanilla_kd``).
        student_hidden_BSD, teacher_hidden_BTE: last hidden states (student with grad).
        student_AD, teacher_AE: hidden states at the aligned rows (``vanilla_kd``: the identity alignment).
        student_head: trainable head; teacher_head: frozen teacher head.
        batch: the Contract 2 micro-batch.
        resources: ``BaselineResources`` (every criterion but ``sft`` needs at least the tokenizer lengths).
        head_grad_weights: expected ``d loss / d sum`` of ``ce`` and ``kd`` (``criteria.head_grad_weights``); a
            ``TrainableHead`` student head then accumulates its gradient in the forward, with no recomputation.
    """
    weights = head_grad_weights or {}
    label_batch_N, label_pos_N, labels_N = _label_rows(batch)
    hidden_ND = student_hidden_BSD[label_batch_N, label_pos_N]
    terms = {"ce": student_ce(hidden_ND, labels_N, student_head, chunk_size=kd.chunk_size,
                              grad_weight=weights.get("ce", 0.0))}
    if criterion == "sft":
        return terms
    if criterion not in BASELINES:
        raise ValueError(f"unknown baseline criterion {criterion!r}; choose one of {BASELINES}")
    if resources is None:
        raise ValueError(f"kd.criterion {criterion!r} needs BaselineResources (tokenizer lengths) from the engine")
    params = DivergenceParams(temperature=kd.temperature, skew_lambda=kd.skew_lambda, akl_alpha=kd.adaptive_kl_alpha)
    if criterion == "vanilla_kd":
        vocab_size = check_same_vocabulary(resources.student_vocab_size, resources.teacher_vocab_size)
        terms.update(
            vanilla_kd_loss(
                student_AD,
                teacher_AE,
                student_head=student_head,
                teacher_head=teacher_head,
                vocab_size=vocab_size,
                divergence=kd.divergence,
                params=params,
                chunk_size=kd.chunk_size,
                grad_weight=weights.get("kd", 0.0),
            )
        )
    elif criterion == "uld":
        pair_batch, student_row, teacher_row = uld_pairs(batch["student_labels"], batch["teacher_labels"])
        terms.update(
            uld_loss(
                student_hidden_BSD[pair_batch, student_row],
                teacher_hidden_BTE[pair_batch, teacher_row],
                student_head=student_head,
                teacher_head=teacher_head,
                student_vocab_size=resources.student_vocab_size,
                teacher_vocab_size=resources.teacher_vocab_size,
                chunk_size=kd.chunk_size,
                grad_weight=weights.get("kd", 0.0),
            )
        )
    elif criterion == "mined":
        resources.require(criterion, "mined")
        teacher_rows_N = mined_teacher_rows(label_batch_N, label_pos_N, batch, resources.mined)
        aligned_N = teacher_rows_N >= 0
        teacher_NE = teacher_hidden_BTE[label_batch_N, teacher_rows_N.clamp_min(0)]
        student_to_teacher = torch.as_tensor(resources.mined.student_to_teacher, device=hidden_ND.device)
        terms.update(
            mined_kd_loss(
                hidden_ND,
                teacher_NE,
                labels_N,
                aligned_N,
                student_head=student_head,
                teacher_head=teacher_head,
                student_to_teacher_ids=student_to_teacher,
                divergence=kd.divergence,
                params=params,
                chunk_size=kd.chunk_size,
                grad_weight=weights.get("kd", 0.0),
            )
        )
    else:  # dskd_cma
        resources.require(criterion, "cma_projectors", "student_embed", "teacher_embed", "student_head_frozen")
        terms.update(
            cma_loss(
                student_hidden_BSD,
                teacher_hidden_BTE,
                student_input_ids_BS=batch["student_input_ids"],
                student_labels_BS=batch["student_labels"],
                teacher_input_ids_BT=batch["teacher_input_ids"],
                teacher_labels_BT=batch["teacher_labels"],
                student_embed=resources.student_embed,
                teacher_embed=resources.teacher_embed,
                projectors=resources.cma_projectors,
                student_head=student_head,
                student_head_frozen=resources.student_head_frozen,
                teacher_head=teacher_head,
                divergence=kd.divergence,
                params=params,
                chunk_size=kd.chunk_size,
            )
        )
    return terms
