"""Universal Logit Distillation (ULD; Boizard et al. 2024), the cross-vocabulary baseline of the DSKD papers.

Shape legend: ``B`` batch, ``S``/``T`` student/teacher positions, ``P`` paired rows, ``C`` rows of one chunk,
``D``/``E`` hidden sizes, ``V``/``W`` student/teacher tokenizer lengths.

The k-th response token of the student is paired with the k-th response token of the teacher (both sequences
are shifted to the response start, as the anchor does; pairs run to the shorter response). Per pair the loss is
the L1 distance between the two probability vectors sorted in decreasing order, the shorter one padded with
zeros to the larger vocabulary::

    uld = sum_r |sort(p_s)[r] - sort(p_t)[r]|          (r over max(V, W) ranks, zero padded)

Computed per chunk (per row block of it for a ``TrainableHead``) without padding anything: the common ranks
give ``|a - b|`` and the tail ranks of the larger vocabulary give their own mass. No ``[P, V]`` tensor exists
beyond one chunk. Head rows beyond the tokenizer lengths (padding) are excluded. The anchor applies no
temperature; ``temperature`` defaults to 1.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from dskd_scale.losses.chunked import HeadFn, trainable_head_loss
from dskd_scale.losses.divergences import at_least_fp32

__all__ = ["sorted_probability_l1", "uld_loss", "uld_pairs"]


def uld_pairs(
    student_labels_BS: Tensor, teacher_labels_BT: Tensor, *, ignore_index: int = -100
) -> tuple[Tensor, Tensor, Tensor]:
    """Pair the k-th response token of each side per example (vectorised; labels not shifted, Contract 2).

    Returns:
        ``(batch_P, student_row_P, teacher_row_P)``: int64; ``h_s[batch_P, student_row_P]`` and
        ``h_t[batch_P, teacher_row_P]`` are the hidden states predicting the k-th response token of each side
        (positions ``s - 1`` and ``t - 1``), for k below the shorter response of the example; ordered by (b, k).
    """
    if student_labels_BS.shape[0] != teacher_labels_BT.shape[0]:
        raise ValueError(f"batch sizes differ: {student_labels_BS.shape[0]} vs {teacher_labels_BT.shape[0]}")
    sides = []
    for labels in (student_labels_BS, teacher_labels_BT):
        batch_N, pos_N = torch.nonzero(labels[:, 1:] != ignore_index, as_tuple=True)  # row-major: by (b, pos)
        counts_B = torch.bincount(batch_N, minlength=labels.shape[0])
        starts_B = torch.cumsum(counts_B, 0) - counts_B
        rank_N = torch.arange(batch_N.numel(), device=labels.device) - starts_B[batch_N]
        sides.append((batch_N, pos_N, rank_N, counts_B))
    (s_batch, s_pos, s_rank, s_counts), (t_batch, t_pos, t_rank, t_counts) = sides
    pairs_B = torch.minimum(s_counts, t_counts)
    keep_s = s_rank < pairs_B[s_batch]
    keep_t = t_rank < pairs_B[t_batch]
    return s_batch[keep_s], s_pos[keep_s], t_pos[keep_t]


def sorted_probability_l1(student_logits_CV: Tensor, teacher_logits_CW: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-row L1 distance between sorted probability vectors, zero-padded to the larger vocabulary: fp32 [C]."""
    student_p = torch.softmax(at_least_fp32(student_logits_CV) / temperature, dim=-1)
    teacher_p = torch.softmax(at_least_fp32(teacher_logits_CW) / temperature, dim=-1)
    student_p = student_p.sort(dim=-1, descending=True).values
    teacher_p = teacher_p.sort(dim=-1, descending=True).values
    common = min(student_p.shape[-1], teacher_p.shape[-1])
    l1 = (student_p[:, :common] - teacher_p[:, :common]).abs().sum(-1)
    # Ranks past the smaller vocabulary meet zero padding: |p - 0| = p (probabilities are >= 0).
    return l1 + student_p[:, common:].sum(-1) + teacher_p[:, common:].sum(-1)


def _uld_rows(
    student_logits: Tensor,
    teacher_hidden_CE: Tensor,
    *,
    teacher_head: HeadFn,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float,
) -> tuple[Tensor]:
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden_CE)
    for side, logits, size in (
        ("student", student_logits, student_vocab_size),
        ("teacher", teacher_logits, teacher_vocab_size),
    ):
        if logits.shape[-1] < size:
            raise ValueError(f"the {side} head has {logits.shape[-1]} rows, fewer than its tokenizer's {size}")
    rows = sorted_probability_l1(
        student_logits[:, :student_vocab_size], teacher_logits[:, :teacher_vocab_size], temperature
    )
    return (rows.sum(),)


def uld_loss(
    student_hidden_PD: Tensor,
    teacher_hidden_PE: Tensor,
    *,
    student_head: HeadFn,
    teacher_head: HeadFn,
    student_vocab_size: int,
    teacher_vocab_size: int,
    temperature: float = 1.0,
    chunk_size: int,
    grad_weight: float = 0.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """ULD over paired rows (``uld_pairs``): ``{"kd": (sum of per-pair sorted-probability L1, P)}``.

    Args:
        student_hidden_PD: student hidden states of the paired rows (grad flows).
        teacher_hidden_PE: teacher hidden states of the paired rows (detached here).
        student_head: trainable ``[C, D] -> [C, >=V]``; teacher_head: frozen ``[C, E] -> [C, >=W]``.
        student_vocab_size, teacher_vocab_size: tokenizer lengths; head rows past them are padding and dropped.
        temperature: divides both sides' logits (1 = the anchor).
        chunk_size: rows per chunk (``chunked.trainable_head_loss``: a ``TrainableHead`` sorts each chunk once,
            any other head callable again in the backward recomputation).
        grad_weight: expected ``d loss / d sum`` (``reduce.term_weights``), used by a ``TrainableHead`` only;
            0 means unknown (exact, recomputed in the backward).
    """
    if teacher_hidden_PE.shape[0] != student_hidden_PD.shape[0]:
        raise ValueError(f"{student_hidden_PD.shape[0]} student rows but {teacher_hidden_PE.shape[0]} teacher rows")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows_fn = partial(
        _uld_rows,
        teacher_head=teacher_head,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
        temperature=temperature,
    )
    (loss_sum,) = trainable_head_loss(
        rows_fn, student_head, student_hidden_PD, teacher_hidden_PE.detach(), chunk_size=chunk_size,
        expected_weights=(grad_weight,),
    )
    return {
        "kd": (loss_sum, torch.tensor(student_hidden_PD.shape[0], dtype=torch.long, device=student_hidden_PD.device))
    }
