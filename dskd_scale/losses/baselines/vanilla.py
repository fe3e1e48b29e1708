"""Same-vocabulary baselines over flat rows: SFT (student CE) and vanilla KD.

Shape legend: ``N`` flat rows, ``C`` rows of one chunk, ``D``/``E`` student/teacher hidden, ``V`` shared tokenizer
length (``len(tokenizer)``, at most each head's row count).

Vanilla KD compares the student's and the teacher's next-token distributions at the same positions of the same
tokenisation. Heads are often padded past the tokenizer (Qwen2.5-7B: 152064 rows, Qwen2.5-1.5B: 151936), so
both sides are cut to the shared tokenizer length ``V``: padded rows are never real tokens, and the anchor's "cut
to the smaller head" is only right by accident. Different tokenizers are refused, never cut.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from dskd_scale.losses.ce import student_ce
from dskd_scale.losses.chunked import HeadFn, trainable_head_loss
from dskd_scale.losses.divergences import DivergenceParams, RowDivergence, resolve_divergence

__all__ = ["check_same_vocabulary", "sft_loss", "vanilla_kd_loss"]


def sft_loss(
    student_hidden_ND: Tensor, labels_N: Tensor, *, student_head: HeadFn, chunk_size: int, ignore_index: int = -100
) -> dict[str, tuple[Tensor, Tensor]]:
    """SFT: ``{"ce": student_ce(...)}``, the student's cross-entropy on gold labels (see ``losses.ce``)."""
    return {
        "ce": student_ce(student_hidden_ND, labels_N, student_head, chunk_size=chunk_size, ignore_index=ignore_index)
    }


def check_same_vocabulary(student_tokenizer_len: int, teacher_tokenizer_len: int) -> int:
    """The shared tokenizer length for vanilla KD; a clear error when the tokenizers differ in length."""
    if student_tokenizer_len != teacher_tokenizer_len:
        raise ValueError(
            f"vanilla KD needs one tokenizer on both sides, but the student tokenizer has {student_tokenizer_len} "
            f"tokens and the teacher's {teacher_tokenizer_len}; use kd.criterion dskd_eta, dskd_cma, uld or mined "
            "for teachers with a different vocabulary"
        )
    return student_tokenizer_len


def _vanilla_rows(
    student_logits: Tensor,
    teacher_hidden_CE: Tensor,
    *,
    teacher_head: HeadFn,
    vocab_size: int,
    row_divergence: RowDivergence,
    params: DivergenceParams,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden_CE)
    for side, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if logits.shape[-1] < vocab_size:
            raise ValueError(f"the {side} head has {logits.shape[-1]} rows, fewer than the tokenizer's {vocab_size}")
    student_logits, teacher_logits = student_logits[:, :vocab_size], teacher_logits[:, :vocab_size]
    loss_sum = row_divergence(student_logits, teacher_logits, params).sum()
    return loss_sum, (student_logits.argmax(-1) == teacher_logits.argmax(-1)).sum()


def vanilla_kd_loss(
    student_hidden_ND: Tensor,
    teacher_hidden_NE: Tensor,
    *,
    student_head: HeadFn,
    teacher_head: HeadFn,
    vocab_size: int,
    divergence: str = "forward_kl",
    params: DivergenceParams | None = None,
    chunk_size: int,
    grad_weight: float = 0.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Vanilla KD, ``D(target = teacher, student)`` per row, on token ids ``< vocab_size`` only.

    Args:
        student_hidden_ND: student hidden states at rows predicting response tokens (grad flows).
        teacher_hidden_NE: teacher hidden states at the same rows (same tokenizer, same text; detached here).
        student_head: trainable ``[C, D] -> [C, >=V]``; teacher_head: frozen ``[C, E] -> [C, >=V]``.
        vocab_size: the shared tokenizer length (``check_same_vocabulary``); head rows past it are ignored.
        divergence: a key of ``DIVERGENCES``; params: its temperature and knobs.
        chunk_size: rows per chunk; both heads run one chunk at a time (``chunked.trainable_head_loss``).
        grad_weight: expected ``d loss / d sum`` (``reduce.term_weights``), used by a ``TrainableHead`` only;
            0 means unknown (exact, recomputed in the backward).

    Returns:
        ``{"kd": (sum, N), "student_teacher_agreement": (argmax hits, N)}``.
    """
    if teacher_hidden_NE.shape[0] != student_hidden_ND.shape[0]:
        raise ValueError(f"{student_hidden_ND.shape[0]} student rows but {teacher_hidden_NE.shape[0]} teacher rows")
    rows_fn = partial(
        _vanilla_rows,
        teacher_head=teacher_head,
        vocab_size=vocab_size,
        row_divergence=resolve_divergence(divergence),
        params=params or DivergenceParams(),
    )
    loss_sum, hits = trainable_head_loss(
        rows_fn, student_head, student_hidden_ND, teacher_hidden_NE.detach(), chunk_size=chunk_size,
        expected_weights=(grad_weight,),
    )
    rows = torch.tensor(student_hidden_ND.shape[0], dtype=torch.long, device=student_hidden_ND.device)
    return {"kd": (loss_sum, rows), "student_teacher_agreement": (hits, rows)}
