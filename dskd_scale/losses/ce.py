"""Student cross-entropy on gold labels, computed in token chunks with backward recomputation.

Shape legend: ``N`` flat rows, ``D`` student hidden, ``V`` student vocabulary.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dskd_scale.losses.chunked import HeadFn, chunked_head_loss
from dskd_scale.losses.divergences import at_least_fp32

__all__ = ["student_ce"]


def _ce_chunk(hidden_CD: Tensor, labels_C: Tensor, *, head: HeadFn, ignore_index: int) -> tuple[Tensor]:
    logits_CV = head(hidden_CD)
    return (F.cross_entropy(at_least_fp32(logits_CV), labels_C, ignore_index=ignore_index, reduction="sum"),)


def student_ce(
    student_hidden_ND: Tensor,
    labels_N: Tensor,
    student_head: HeadFn,
    *,
    chunk_size: int,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor]:
    """Sum of next-token cross-entropy over labelled rows.

    Args:
        student_hidden_ND: hidden states at the rows that predict ``labels_N`` (already shifted by the caller).
        labels_N: int64 target ids, ``ignore_index`` on rows that do not count.
        student_head: ``head(h_CD) -> logits_CV``; called one chunk at a time, twice per chunk (forward
            and backward recomputation), so no ``[N, V]`` tensor is ever held.
        chunk_size: rows per chunk.

    Returns:
        ``(sum, count)``: fp32 scalar CE sum (softmax in fp32), int64 number of non-ignored labels.
    """
    if labels_N.shape != student_hidden_ND.shape[:1]:
        raise ValueError(
            f"labels_N has shape {tuple(labels_N.shape)}, expected ({student_hidden_ND.shape[0]},) to match the rows"
        )

    def chunk_fn(hidden_CD: Tensor, labels_C: Tensor) -> tuple[Tensor]:
        return _ce_chunk(hidden_CD, labels_C, head=student_head, ignore_index=ignore_index)

    (loss_sum,) = chunked_head_loss(chunk_fn, student_hidden_ND, labels_N.long(), chunk_size=chunk_size)
    return loss_sum, (labels_N != ignore_index).sum()
