"""Exact token alignment of a batch of (prompt + response) rows at once: the one code path shared by offline
prealignment (``dskd_scale.prealign.batch_rows``) and online alignment of student rollouts (``online``).

Each side's tokens of all rows are concatenated (``row`` says which row a token belongs to) and every row's byte
spans are shifted by the bytes of the rows before it plus a one-byte gap, so spans of different rows never
coincide and one call of ``exact_token_alignment`` over the concatenation yields every row's alignment. Only
response tokens (whole span at or after the row's prompt/response boundary) are aligned; a token straddling the
boundary counts as prompt. A row ending in EOS pairs EOS with EOS. Pairs touching position 0 are dropped
because no position predicts them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dskd_scale.alignment.eta import exact_token_alignment, span_keys
from dskd_scale.alignment.spans import TokenSpans


@dataclass
class FlatSide:
    """One side's tokens of every row of a batch, EOS included (legend: N tokens, R rows)."""

    ids: np.ndarray  # int64 [N]
    starts: np.ndarray  # int64 [N], row-local character offsets
    ends: np.ndarray  # int64 [N]
    byte_starts: np.ndarray  # int64 [N], row-local byte offsets
    byte_ends: np.ndarray  # int64 [N]
    word_starts: np.ndarray  # int64 [N], byte starts after leading spaces (TokenSpans.word_starts)
    alignable: np.ndarray  # bool [N]
    response: np.ndarray  # bool [N]
    appended_eos: np.ndarray  # bool [N], the EOS added here (not by the tokenizer)
    row: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [R+1], row r is [offsets[r], offsets[r+1])
    straddles: np.ndarray  # int64 [R]
    row_bytes: np.ndarray  # int64 [R], bytes of each row's text
    fingerprint: str
    template: TokenSpans

    @property
    def position(self) -> np.ndarray:
        """int64 [N]: each token's position in its row."""
        return np.arange(self.ids.size) - self.offsets[self.row]

    def rows(self, field: str) -> list[np.ndarray]:
        """``field`` split into one view per row."""
        values, bounds = getattr(self, field), self.offsets.tolist()
        return [values[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def flatten_side(spans: list[TokenSpans], boundaries: np.ndarray, with_eos: np.ndarray, eos_id: int,
                 special: np.ndarray) -> FlatSide:
    """Concatenate one side's rows; rows with ``with_eos`` get an EOS unless the tokenizer already appended one.

    ``boundaries`` int64 [R]: character position where each row's response starts; ``special`` bool [V]: ids
    that are special tokens (never response tokens, except the final EOS).
    """
    sizes = np.fromiter((s.ids.size for s in spans), dtype=np.int64, count=len(spans))
    text_lengths = np.fromiter((s.text_length for s in spans), dtype=np.int64, count=len(spans))
    num_bytes = np.fromiter((s.num_bytes for s in spans), dtype=np.int64, count=len(spans))
    fields = {name: np.concatenate([getattr(s, name) for s in spans]).astype(np.int64, copy=False)
              for name in ("ids", "starts", "ends", "byte_starts", "byte_ends", "word_starts")}
    alignable = np.concatenate([s.alignable for s in spans]).astype(bool, copy=False)
    ids, starts, ends = fields["ids"], fields["starts"], fields["ends"]
    row = np.repeat(np.arange(len(spans)), sizes)
    content = ~special[ids]
    row_boundary = boundaries[row]
    response = content & (starts >= row_boundary)
    straddling = content & (starts < row_boundary) & (ends > row_boundary)
    straddles = np.bincount(row[straddling], minlength=len(spans))

    last = np.cumsum(sizes) - 1
    nonempty = sizes > 0
    final_eos = np.zeros(len(spans), dtype=bool)
    final_eos[nonempty] = (with_eos[nonempty] & (ids[last[nonempty]] == eos_id)
                           & (ends[last[nonempty]] == starts[last[nonempty]]))
    response[last[final_eos]] = True
    append = with_eos & ~final_eos
    insert_at = (last + 1)[append]
    appended_rows = np.flatnonzero(append)
    ids = np.insert(ids, insert_at, eos_id)
    for name, end_value in (("starts", text_lengths), ("ends", text_lengths), ("byte_starts", num_bytes),
                            ("byte_ends", num_bytes), ("word_starts", num_bytes)):
        fields[name] = np.insert(fields[name], insert_at, end_value[append])
    alignable = np.insert(alignable, insert_at, False)
    response = np.insert(response, insert_at, True)
    appended_eos = np.insert(np.zeros(row.size, dtype=bool), insert_at, True)
    row = np.insert(row, insert_at, appended_rows)
    offsets = np.zeros(len(spans) + 1, dtype=np.int64)
    np.cumsum(sizes + append, out=offsets[1:])
    return FlatSide(ids, fields["starts"], fields["ends"], fields["byte_starts"], fields["byte_ends"],
                    fields["word_starts"], alignable, response, appended_eos, row, offsets, straddles, num_bytes,
                    spans[0].fingerprint, spans[0])


def _row_byte_offsets(student: FlatSide, teacher: FlatSide) -> tuple[np.ndarray, int]:
    """Byte offset of each row in the concatenation (rows separated by one byte), and the total bytes."""
    if not np.array_equal(student.row_bytes, teacher.row_bytes):
        raise ValueError("align_flat: student and teacher rows describe different texts")
    num_bytes = student.row_bytes
    offset = np.zeros(num_bytes.size, dtype=np.int64)
    np.cumsum(num_bytes[:-1] + 1, out=offset[1:])
    return offset, int(offset[-1] + num_bytes[-1]) if num_bytes.size else 0


def _concatenated_response(side: FlatSide, byte_offset: np.ndarray, total_bytes: int) -> tuple[np.ndarray,
                                                                                             TokenSpans]:
    """Flat indices of the tokens to align, and them as one TokenSpans over the concatenated texts."""
    selected = np.flatnonzero(side.response & ~side.appended_eos)
    shift = byte_offset[side.row[selected]]
    spans = dataclasses.replace(
        side.template, ids=side.ids[selected], starts=side.byte_starts[selected] + shift,
        ends=side.byte_ends[selected] + shift, alignable=side.alignable[selected], text_length=total_bytes,
        byte_starts=side.byte_starts[selected] + shift, byte_ends=side.byte_ends[selected] + shift,
        word_starts=side.word_starts[selected] + shift, num_bytes=total_bytes,
    )
    return selected, spans


@dataclass
class BatchAlignment:
    """Aligned positions of every row (row-local), concatenated: row r's pairs are ``[offsets[r], offsets[r+1])``."""

    align_student: np.ndarray  # int64 [P]
    align_teacher: np.ndarray  # int64 [P]
    offsets: np.ndarray  # int64 [R+1]

    def rows(self, field: str) -> list[np.ndarray]:
        values, bounds = getattr(self, field), self.offsets.tolist()
        return [values[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def align_flat(student: FlatSide, teacher: FlatSide, with_eos: np.ndarray, *, whitespace: str = "exact",
               ) -> BatchAlignment:
    """Every row's exact token alignment of the response tokens, plus EOS↔EOS for rows ``with_eos``."""
    rows = with_eos.size
    byte_offset, total_bytes = _row_byte_offsets(student, teacher)
    student_selected, student_cat = _concatenated_response(student, byte_offset, total_bytes)
    teacher_selected, teacher_cat = _concatenated_response(teacher, byte_offset, total_bytes)
    idx_student, idx_teacher = exact_token_alignment(student_cat, teacher_cat, whitespace=whitespace)
    eos_rows = np.flatnonzero(with_eos)
    flat_student = np.concatenate([student_selected[idx_student], student.offsets[eos_rows + 1] - 1])
    flat_teacher = np.concatenate([teacher_selected[idx_teacher], teacher.offsets[eos_rows + 1] - 1])
    pair_row = student.row[flat_student]
    order = np.lexsort((flat_student, pair_row))
    flat_student, flat_teacher, pair_row = flat_student[order], flat_teacher[order], pair_row[order]
    align_student = flat_student - student.offsets[pair_row]
    align_teacher = flat_teacher - teacher.offsets[pair_row]
    predictable = (align_student >= 1) & (align_teacher >= 1)
    pair_row = pair_row[predictable]
    return BatchAlignment(align_student[predictable], align_teacher[predictable],
                          np.searchsorted(pair_row, np.arange(rows + 1)))


def span_optimum(student: FlatSide, teacher: FlatSide, identical: np.ndarray, with_eos: np.ndarray, *,
                 whitespace: str = "exact") -> np.ndarray:
    """int64 [R]: per row, the number of alignable student response tokens (position >= 1) whose byte-span key
    (under ``whitespace``) equals an alignable teacher response token's key, plus the EOS pair. With
    identical tokenizations every response token covering text pairs with itself."""
    rows = with_eos.size
    byte_offset, total_bytes = _row_byte_offsets(student, teacher)
    keys = []
    for side in (student, teacher):
        usable = side.response & side.alignable & (side.position >= 1)
        shift = byte_offset[side.row[usable]]
        keys.append((span_keys(side.byte_starts[usable] + shift, side.byte_ends[usable] + shift,
                               side.word_starts[usable] + shift, total_bytes, whitespace), side.row[usable]))
    _, matched, _ = np.intersect1d(keys[0][0], keys[1][0], assume_unique=True, return_indices=True)
    optimum = np.bincount(keys[0][1][matched], minlength=rows)
    if identical.any():
        covering = student.response & (student.byte_ends > student.byte_starts) & (student.position >= 1)
        optimum = np.where(identical, np.bincount(student.row[covering], minlength=rows), optimum)
    student_sizes, teacher_sizes = np.diff(student.offsets), np.diff(teacher.offsets)
    return optimum + (with_eos & (student_sizes >= 2) & (teacher_sizes >= 2))


def identical_rows(teacher_spans: list[TokenSpans], student_spans: list[TokenSpans]) -> np.ndarray:
    """bool [R]: both sides come from the same tokenizer and produced the same ids (identity alignment)."""
    if not teacher_spans or teacher_spans[0].fingerprint != student_spans[0].fingerprint:
        return np.zeros(len(teacher_spans), dtype=bool)
    return np.array([np.array_equal(t.ids, s.ids) for t, s in zip(teacher_spans, student_spans, strict=True)])
