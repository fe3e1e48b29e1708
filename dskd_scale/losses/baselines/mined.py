"""MinED KD (FuseLLM's minimum-edit-distance alignment; a cross-vocabulary baseline of the DSKD papers).

Shape legend: ``N`` student label rows, ``C`` rows of one chunk, ``D``/``E`` hidden sizes, ``V`` student head
rows, ``W`` teacher head rows.

Every student response row gets a target distribution over the student vocabulary:

- an *aligned* row (its predicted token has a one-to-one DTW partner whose MinED-mapped id is that very token,
  ``dskd_scale.alignment.mined.mined_alignment``) takes the teacher's next-token logits at the partner row moved
  into the student vocabulary: ``target[v] = z_t[student_to_teacher[v]]``, ``-inf`` (a masked entry) where no
  teacher id maps to ``v`` or past the tokenizer;
- every other row takes the one-hot gold token (its KD term is then the student's CE at the temperature).

The loss is ``D(target, student)`` per row (the anchor uses forward KL; other divergences follow the masked-entry
rule of ``divergences.py``), summed with count = all student label rows. No ``[N, V]`` tensor exists beyond one
chunk; teacher logits are formed per chunk (per row block for a ``TrainableHead``), never stored.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import Tensor

from dskd_scale.alignment.mined import MinedMap, mined_alignment
from dskd_scale.losses.chunked import HeadFn, trainable_head_loss
from dskd_scale.losses.divergences import DivergenceParams, RowDivergence, at_least_fp32, resolve_divergence

__all__ = ["mined_kd_loss", "mined_teacher_rows", "mined_target_logits"]


def mined_target_logits(
    teacher_logits_CW: Tensor, labels_C: Tensor, aligned_C: Tensor, student_to_teacher_V: Tensor, head_rows: int
) -> Tensor:
    """Target logits ``[C, head_rows]`` in the student vocabulary (see the module docstring); no gradient."""
    mapped = student_to_teacher_V >= 0
    if bool((student_to_teacher_V >= teacher_logits_CW.shape[-1]).any()):
        raise ValueError(f"student_to_teacher points past the teacher head's {teacher_logits_CW.shape[-1]} rows")
    gathered = teacher_logits_CW[:, student_to_teacher_V.clamp_min(0)]
    gathered = at_least_fp32(gathered).masked_fill(~mapped, float("-inf"))
    target = gathered.new_full((labels_C.shape[0], head_rows), float("-inf"))
    width = min(head_rows, gathered.shape[-1])
    target[:, :width] = gathered[:, :width]
    one_hot = torch.full_like(target, float("-inf"))
    one_hot.scatter_(1, labels_C.clamp_min(0).unsqueeze(1), 0.0)
    return torch.where(aligned_C.unsqueeze(1), target, one_hot)


def _mined_rows(
    student_logits: Tensor,
    teacher_hidden_CE: Tensor,
    labels_C: Tensor,
    aligned_C: Tensor,
    *,
    teacher_head: HeadFn,
    student_to_teacher_V: Tensor,
    row_divergence: RowDivergence,
    params: DivergenceParams,
) -> tuple[Tensor]:
    with torch.no_grad():
        target = mined_target_logits(
            teacher_head(teacher_hidden_CE), labels_C, aligned_C, student_to_teacher_V, student_logits.shape[-1]
        )
    return (row_divergence(student_logits, target, params).sum(),)


def mined_kd_loss(
    student_hidden_ND: Tensor,
    teacher_hidden_NE: Tensor,
    labels_N: Tensor,
    aligned_N: Tensor,
    *,
    student_head: HeadFn,
    teacher_head: HeadFn,
    student_to_teacher_ids: Tensor,
    divergence: str = "forward_kl",
    params: DivergenceParams | None = None,
    chunk_size: int,
    grad_weight: float = 0.0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """MinED KD over every student label row.

    Args:
        student_hidden_ND: student hidden states at the rows predicting ``labels_N`` (grad flows).
        teacher_hidden_NE: teacher hidden state of each row's aligned partner row; rows with ``aligned_N`` False
            may hold anything finite (they are not read for the target).
        labels_N: gold next-token ids (all valid: rows are label rows).
        aligned_N: bool, True where the row has a MinED partner (``mined_teacher_rows``).
        student_head: trainable ``[C, D] -> [C, V]``; teacher_head: frozen ``[C, E] -> [C, W]``.
        student_to_teacher_ids: int64 ``[len(student tokenizer)]`` from the MinED map, -1 where none maps.
        divergence, params: the divergence and its temperature; chunk_size: rows per chunk.
        grad_weight: expected ``d loss / d sum`` (``reduce.term_weights``), used by a ``TrainableHead`` only;
            0 means unknown (exact, recomputed in the backward).

    Returns:
        ``{"kd": (sum, N), "mined_aligned": (aligned rows, N)}``.
    """
    rows = student_hidden_ND.shape[0]
    for name, tensor in (("teacher_hidden_NE", teacher_hidden_NE), ("labels_N", labels_N), ("aligned_N", aligned_N)):
        if tensor.shape[0] != rows:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, student_hidden_ND has {rows}")
    if bool((labels_N < 0).any()):
        raise ValueError("labels_N holds ignored labels; pass label rows only")
    rows_fn = partial(
        _mined_rows,
        teacher_head=teacher_head,
        student_to_teacher_V=student_to_teacher_ids.to(device=student_hidden_ND.device, dtype=torch.long),
        row_divergence=resolve_divergence(divergence),
        params=params or DivergenceParams(),
    )
    aligned_N = aligned_N.to(torch.bool)
    (loss_sum,) = trainable_head_loss(
        rows_fn, student_head, student_hidden_ND, teacher_hidden_NE.detach(), labels_N.long(), aligned_N,
        chunk_size=chunk_size, expected_weights=(grad_weight,),
    )
    count = torch.tensor(rows, dtype=torch.long, device=student_hidden_ND.device)
    return {"kd": (loss_sum, count), "mined_aligned": (aligned_N.sum(), count)}


def mined_teacher_rows(
    label_batch_N: Tensor,
    label_pos_N: Tensor,
    batch: dict[str, Tensor],
    mined: MinedMap,
    *,
    ignore_index: int = -100,
) -> Tensor:
    """For each student label row ``(b, s - 1)``, the teacher row ``t - 1`` of its MinED partner, or -1.

    Uses ``batch["mined_align_batch" / "mined_align_student" / "mined_align_teacher"]`` (shard convention of
    ``align_*``) when the data pipeline stored them; otherwise runs ``mined_alignment`` per example on the CPU
    (DTW is O(S*T) per example: fine for a baseline, precompute it for long sequences).

    Returns:
        int64 ``[N]`` on the device of ``label_pos_N``.
    """
    if "mined_align_student" in batch:
        pair_batch = batch["mined_align_batch"].long()
        pair_student = batch["mined_align_student"].long()
        pair_teacher = batch["mined_align_teacher"].long()
    else:
        student_ids = batch["student_input_ids"].cpu().numpy()
        student_labels = batch["student_labels"].cpu().numpy()
        teacher_ids = batch["teacher_input_ids"].cpu().numpy()
        teacher_labels = batch["teacher_labels"].cpu().numpy()
        parts = []
        for b in range(student_ids.shape[0]):
            s, t = mined_alignment(
                student_ids[b],
                student_labels[b],
                teacher_ids[b],
                teacher_labels[b],
                student_vocab_bytes=mined.student_token_bytes,
                teacher_vocab_bytes=mined.teacher_token_bytes,
                teacher_to_student=mined.teacher_to_student,
                ignore_index=ignore_index,
            )
            parts.append(np.stack([np.full_like(s, b), s, t]))
        pairs = torch.from_numpy(np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64))
        pair_batch, pair_student, pair_teacher = pairs
    device = label_pos_N.device
    width = int(batch["student_labels"].shape[1])
    row_keys = label_batch_N.long() * width + label_pos_N.long()
    pair_keys = (pair_batch * width + pair_student - 1).to(device)
    where = torch.searchsorted(row_keys, pair_keys)  # label rows are sorted by (b, position)
    where_ok = where.clamp_max(max(row_keys.numel() - 1, 0))
    if pair_keys.numel() and (row_keys.numel() == 0 or not bool((row_keys[where_ok] == pair_keys).all())):
        raise ValueError("a MinED pair points at a student position that is not a label row")
    teacher_rows = torch.full_like(row_keys, -1)
    teacher_rows[where] = (pair_teacher - 1).to(device)
    return teacher_rows
