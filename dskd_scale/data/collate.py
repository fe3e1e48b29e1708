"""Dynamic-padding collate: prealigned examples -> the batch dict of docs/design.md Contract 2.

Shape legend: ``B`` examples, ``S`` student positions, ``T`` teacher positions, ``A`` aligned pairs in the batch.

Assumptions:
- Examples come from ``PrealignedDataset`` (shards written by ``tools/prealign.py``): per example, input ids and
  labels of equal length per side, and alignment positions into those input ids.
- Right padding, so alignment positions and label positions do not move; padding is to the longest row of this
  batch on each side independently (``S`` and ``T`` differ), never to a configured maximum length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from dskd_scale.data.format import IGNORE_INDEX

__all__ = ["Collator", "pad_right"]


def pad_right(rows: Sequence[np.ndarray], pad_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Stack 1-D int rows into ``[B, L]`` int64 padded on the right to the longest row ``L``.

    Returns:
        ``(padded_BL, lengths_B)``. Vectorised: one concatenate plus one scatter, no loop over tokens.
    """
    lengths_B = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    width = int(lengths_B.max(initial=0))
    padded_BL = np.full((len(rows), width), pad_value, dtype=np.int64)
    if width:
        flat = np.concatenate(rows).astype(np.int64, copy=False)
        row_of_token = np.repeat(np.arange(len(rows)), lengths_B)
        row_start = np.cumsum(lengths_B) - lengths_B
        padded_BL[row_of_token, np.arange(flat.size) - row_start[row_of_token]] = flat
    return padded_BL, lengths_B


def _teacher_rows(examples: Sequence[Mapping[str, np.ndarray]], align_lengths_B: np.ndarray) -> np.ndarray:
    """The examples' cached teacher rows ``[A, E]`` float32, one per alignment pair, in the batch's align order."""
    rows = [np.asarray(ex["teacher_hidden_rows"], dtype=np.float32) for ex in examples]
    for ex, rows_AE, pairs in zip(examples, rows, align_lengths_B.tolist(), strict=True):
        if rows_AE.ndim != 2 or rows_AE.shape[0] != pairs:
            raise ValueError(f"example_index {int(ex['example_index'])}: {rows_AE.shape[0] if rows_AE.ndim else 0} "
                             f"cached teacher rows for {pairs} alignment pairs")
    return np.concatenate(rows)


class Collator:
    """Turns a list of prealigned examples into Contract 2 tensors (all int64).

    Output keys: ``student_input_ids/attention_mask/labels [B,S]``, ``teacher_* [B,T]`` (padding: the side's pad
    id, mask 0, label -100), ``align_batch/align_student/align_teacher [A]`` (row in the batch and positions into
    that row's input ids, unchanged from the shard), ``example_index [B]``, ``num_examples`` (0-dim tensor: the
    rows that count, i.e. ``B`` minus repeat rows). Examples that carry ``teacher_hidden_rows`` ``[A_i, E]`` (a
    teacher hidden-state cache, one row per alignment pair) add ``teacher_hidden_rows [A, E]`` float32, row ``a``
    the teacher's last hidden state at ``align_teacher[a] - 1``.

    An example carrying ``is_repeat=True`` (a slot that only fills the last step of an epoch, see
    ``ResumableDistributedSampler``) is kept in the batch, so every rank runs the same shapes of work, but
    contributes nothing: its labels are all -100 and its alignment pairs are dropped.

    Args:
        student_pad_id, teacher_pad_id: token id written into padding positions of each side's input ids. Padding
            is masked out, so any valid id works; the tokenizer's pad (or EOS) id keeps logs readable.
    """

    def __init__(self, student_pad_id: int, teacher_pad_id: int):
        if student_pad_id < 0 or teacher_pad_id < 0:
            raise ValueError(
                f"pad ids must be valid token ids >= 0, got student_pad_id={student_pad_id}, "
                f"teacher_pad_id={teacher_pad_id} (use the tokenizer's eos id when it has no pad token)"
            )
        self.student_pad_id = int(student_pad_id)
        self.teacher_pad_id = int(teacher_pad_id)

    def __call__(self, examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        batch: dict[str, np.ndarray] = {}
        is_repeat_B = np.fromiter((bool(ex.get("is_repeat", False)) for ex in examples), bool, len(examples))
        for side, pad_id in (("student", self.student_pad_id), ("teacher", self.teacher_pad_id)):
            ids_BL, lengths_B = pad_right([ex[f"{side}_input_ids"] for ex in examples], pad_id)
            labels_BL, label_lengths_B = pad_right([ex[f"{side}_labels"] for ex in examples], IGNORE_INDEX)
            if not np.array_equal(lengths_B, label_lengths_B):
                bad = int(np.flatnonzero(lengths_B != label_lengths_B)[0])
                raise ValueError(
                    f"example_index {int(examples[bad]['example_index'])}: {side}_labels has "
                    f"{label_lengths_B[bad]} tokens but {side}_input_ids has {lengths_B[bad]}"
                )
            batch[f"{side}_input_ids"] = ids_BL
            batch[f"{side}_attention_mask"] = (np.arange(ids_BL.shape[1]) < lengths_B[:, None]).astype(np.int64)
            labels_BL[is_repeat_B] = IGNORE_INDEX
            batch[f"{side}_labels"] = labels_BL

        align_lengths_B = np.fromiter((len(ex["align_student"]) for ex in examples), np.int64, len(examples))
        align_batch_A = np.repeat(np.arange(len(examples), dtype=np.int64), align_lengths_B)
        keep_A = ~is_repeat_B[align_batch_A]
        batch["align_batch"] = align_batch_A[keep_A]
        for side in ("student", "teacher"):
            positions_A = np.concatenate([ex[f"align_{side}"] for ex in examples]).astype(np.int64, copy=False)
            if positions_A.shape != align_batch_A.shape:
                raise ValueError(f"align_student and align_{side} differ in length in this batch")
            batch[f"align_{side}"] = positions_A[keep_A]
        batch["example_index"] = np.fromiter((int(ex["example_index"]) for ex in examples), np.int64, len(examples))
        if "teacher_hidden_rows" in examples[0]:
            batch["teacher_hidden_rows"] = _teacher_rows(examples, align_lengths_B)[keep_A]
        out = {key: torch.from_numpy(value) for key, value in batch.items()}
        out["num_examples"] = torch.tensor(int((~is_repeat_B).sum()), dtype=torch.int64)
        return out
