"""Student cross-entropy on gold labels, computed in token chunks (``chunked.trainable_head_loss``).

Shape legend: ``N`` flat rows, ``D`` student hidden, ``V`` student vocabulary.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from dskd_scale.losses.chunked import HeadFn, trainable_head_loss
from dskd_scale.losses.divergences import at_least_fp32

__all__ = ["student_ce"]


def _ce_from_logits(logits_CV: Tensor, labels_C: Tensor, *, ignore_index: int) -> tuple[Tensor]:
    return (F.cross_entropy(at_least_fp32(logits_CV), labels_C, ignore_index=ignore_index, reduction="sum"),)


def student_ce(
    student_hidden_ND: Tensor,
    labels_N: Tensor,
    student_head: HeadFn,
    *,
    chunk_size: int,
    ignore_index: int = -100,
    grad_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropy over labelled rows.

    Args:
        student_hidden_ND: hidden states at the rows that predict ``labels_N`` (already shifted by the caller).
        labels_N: int64 target ids, ``ignore_index`` on rows that do not count.
        student_head: a ``TrainableHead`` (weight gradient accumulated in the forward, one ``[V, D]``
            buffer, no recomputation) or any ``head(h_CD) -> logits_CV``, called one chunk at a time, twice
            per chunk (forward and backward recomputation). No ``[N, V]`` tensor is ever held.
        chunk_size: rows per chunk.
        grad_weight: expected ``d loss / d sum`` (``reduce.term_weights``), used by a ``TrainableHead`` only;
            0 means unknown (exact, recomputed in the backward).

    Returns:
        ``(sum, count)``: fp32 scalar CE sum (softmax in fp32), int64 number of non-ignored labels.
    """
    if labels_N.shape != student_hidden_ND.shape[:1]:
        raise ValueError(
            f"labels_N has shape {tuple(labels_N.shape)}, expected ({student_hidden_ND.shape[0]},) to match the rows"
        )

    count = (labels_N != ignore_index).sum()
    (loss_sum,) = trainable_head_loss(
        partial(_ce_from_logits, ignore_index=ignore_index), student_head, student_hidden_ND, labels_N.long(),
        chunk_size=chunk_size, expected_weights=(grad_weight,),
    )
    return loss_sum, count
