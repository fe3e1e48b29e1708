"""Teacher <-> student vocabulary map by the raw bytes each token stands for, built once per pair.

Never via ``convert_tokens_to_ids`` (it returns the unk id, GPT-2: EOS, for unknown strings) and never by
surface strings ('Ġ' vs '▁', or Llama's literal 'Ġ' token vs its '▁'). Tokens with the same bytes are
paired one to one; when one vocabulary holds several ids for the same bytes (a SentencePiece 'A' and its
byte-fallback '<0x41>'), ordinary pieces pair first, so the map stays injective and identical tokenizers
get the identity. Special tokens pair by role (eos, bos, pad), then by identical content.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd_scale.alignment.token_bytes import TokenTable, token_table

SPECIAL_ROLES = ("eos_token_id", "bos_token_id", "pad_token_id")


@dataclass(frozen=True, eq=False)
class VocabMap:
    """Teacher/student id maps (−1 where no counterpart) and the paired overlap ids.

    - ``teacher_to_student`` int64 [len(teacher_tokenizer)], ``student_to_teacher`` int64 [len(student_tokenizer)]:
      mutually inverse on mapped ids (injective).
    - ``overlap_teacher_ids``, ``overlap_student_ids`` int64 [O]: every mapped pair, sorted by student id;
      all ids < len(tokenizer), so padded head rows are never included.
    """

    teacher_to_student: np.ndarray
    student_to_teacher: np.ndarray
    overlap_teacher_ids: np.ndarray
    overlap_student_ids: np.ndarray

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The four arrays by their shard-format names (``vocab_map.safetensors``)."""
        return {
            "teacher_to_student": self.teacher_to_student,
            "student_to_teacher": self.student_to_teacher,
            "overlap_teacher_ids": self.overlap_teacher_ids,
            "overlap_student_ids": self.overlap_student_ids,
        }


_GROUPS: weakref.WeakKeyDictionary[TokenTable, dict[bytes, list[int]]] = weakref.WeakKeyDictionary()


def _ids_by_bytes(table: TokenTable) -> dict[bytes, list[int]]:
    """bytes -> ids standing for them, ordinary pieces before byte-fallback tokens, then by id (cached)."""
    cached = _GROUPS.get(table)
    if cached is not None:
        return cached
    has_bytes = np.flatnonzero(table.byte_lengths >= 0)
    order = has_bytes[np.lexsort((has_bytes, table.byte_fallback[has_bytes]))]
    groups: dict[bytes, list[int]] = {}
    for token_id in order.tolist():  # once per vocabulary, not on a per-text path
        groups.setdefault(table.token_bytes[token_id], []).append(token_id)
    _GROUPS[table] = groups
    return groups


def _special_content(tokenizer: Any, table: TokenTable) -> dict[str, int]:
    ids = sorted(table.special_ids)
    return dict(zip(tokenizer.convert_ids_to_tokens(ids), ids, strict=True))


def build_vocab_map(teacher_tokenizer: Any, student_tokenizer: Any) -> VocabMap:
    """Map teacher ids to student ids standing for identical bytes (plus special tokens by role)."""
    teacher = token_table(teacher_tokenizer, "teacher tokenizer")
    student = token_table(student_tokenizer, "student tokenizer")
    teacher_to_student = np.full(teacher.vocab_size, -1, dtype=np.int64)
    student_to_teacher = np.full(student.vocab_size, -1, dtype=np.int64)

    def pair(teacher_id: int, student_id: int) -> None:
        teacher_to_student[teacher_id] = student_id
        student_to_teacher[student_id] = teacher_id

    student_groups = _ids_by_bytes(student)
    for raw, teacher_ids in _ids_by_bytes(teacher).items():
        for teacher_id, student_id in zip(teacher_ids, student_groups.get(raw, ()), strict=False):
            pair(teacher_id, student_id)

    for role in SPECIAL_ROLES:
        teacher_id = getattr(teacher_tokenizer, role, None)
        student_id = getattr(student_tokenizer, role, None)
        if teacher_id is None or student_id is None:
            continue
        if not (0 <= teacher_id < teacher.vocab_size and 0 <= student_id < student.vocab_size):
            raise ValueError(f"{role}: id {teacher_id} (teacher) or {student_id} (student) outside the vocabulary")
        if teacher_to_student[teacher_id] < 0 and student_to_teacher[student_id] < 0:
            pair(teacher_id, student_id)  # e.g. teacher pad == teacher eos keeps its eos pairing

    student_specials = _special_content(student_tokenizer, student)
    for content, teacher_id in _special_content(teacher_tokenizer, teacher).items():
        student_id = student_specials.get(content)
        if student_id is not None and teacher_to_student[teacher_id] < 0 and student_to_teacher[student_id] < 0:
            pair(teacher_id, student_id)

    overlap_student_ids = np.flatnonzero(student_to_teacher >= 0).astype(np.int64)
    return VocabMap(
        teacher_to_student=teacher_to_student,
        student_to_teacher=student_to_teacher,
        overlap_teacher_ids=student_to_teacher[overlap_student_ids],
        overlap_student_ids=overlap_student_ids,
    )
