"""Student cross-entropy on gold labels, computed in token chunks with backward recomputation.

Shape legend: ``N`` flat rows, ``D`` student hidden, ``V`` student vocabulary.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from dskd_scale.losses.chunked import HeadFn, TrainableHead, chunked_head_loss, fused_head_chunk, split_rows
from dskd_scale.losses.divergences import at_least_fp32

__all__ = ["student_ce"]


def _ce_from_logits(logits_CV: Tensor, labels_C: Tensor, *, ignore_index: int) -> tuple[Tensor]:
    return (F.cross_entropy(at_least_fp32(logits_CV), labels_C, ignore_index=ignore_index, reduction="sum"),)


def _ce_chunk(hidden_CD: Tensor, labels_C: Tensor, *, head: HeadFn, ignore_index: int) -> tuple[Tensor]:
    return _ce_from_logits(head(hidden_CD), labels_C, ignore_index=ignore_index)


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
    if isinstance(student_head, TrainableHead):
        loss_sum = student_hidden_ND.sum().float() * 0.0  # attached to the graph even with no rows
        ce_fn = partial(_ce_from_logits, ignore_index=ignore_index)
        for hidden_CD, labels_C in split_rows([student_hidden_ND, labels_N.long()], chunk_size):
            (chunk_sum,) = fused_head_chunk(ce_fn, student_head, hidden_CD, labels_C, expected_weights=(grad_weight,))
            loss_sum = loss_sum + chunk_sum
        return loss_sum, count

    def chunk_fn(hidden_CD: Tensor, labels_C: Tensor) -> tuple[Tensor]:
        return _ce_chunk(hidden_CD, labels_C, head=student_head, ignore_index=ignore_index)

    (loss_sum,) = chunked_head_loss(chunk_fn, student_hidden_ND, labels_N.long(), chunk_size=chunk_size)
    return loss_sum, count
