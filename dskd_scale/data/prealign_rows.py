"""One instruction example -> one prealigned row (Contract 1), with the truncation policy.

Each tokenizer encodes ``prompt + response`` jointly (with its own BOS, if it adds one) and gets its EOS
appended. A token is a *response token* only if its whole character span lies inside the response; a token
straddling the prompt/response boundary (e.g. a merged ``":\\n"`` piece) counts as prompt: label −100, never
aligned, counted in ``boundary_straddles_<side>``. Aligned pairs come from exact token alignment over the
response tokens (identical character spans), plus EOS↔EOS; pairs touching position 0 are dropped because no
position predicts them.

Truncation policy (``TRUNCATION_POLICY``), applied when either side exceeds ``max_length`` tokens:
1. cut the prompt from the left at the first character position that starts a token on *both* sides (or at
   the response start) such that both sides fit, so teacher and student always see the same text;
2. if the response alone does not fit, drop the prompt and cut the response from the right at a position
   that ends a token on both sides; such a row gets no EOS (the answer did not end there).
Both cases are counted (``prompt_truncated``, ``response_truncated``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd_scale.alignment import TokenSpans, encode_with_spans, exact_token_alignment
from dskd_scale.data.format import IGNORE_INDEX

TRUNCATION_POLICY = (
    "prompt cut from the left at a character position starting a token on both sides; if the response alone is "
    "too long, the prompt is dropped and the response cut from the right at a position ending a token on both "
    "sides, without EOS; tokens straddling the prompt/response boundary count as prompt"
)
_MAX_CUT_ATTEMPTS = 8


@dataclass
class SideEncoding:
    """One tokenizer's view of a (possibly truncated) example.

    ``ids [L]`` the final input ids (EOS included unless the response was cut); ``starts/ends [L]`` character
    offsets into ``text`` (EOS gets ``[len(text), len(text))``); ``response [L]`` bool, response tokens and EOS;
    ``alignable [L]`` bool, tokens standing alone for whole characters (``TokenSpans.alignable``).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    response: np.ndarray
    alignable: np.ndarray
    straddles: int


@dataclass
class RowResult:
    """A finished row plus what the statistics and the report need."""

    columns: dict[str, np.ndarray]
    text: str
    boundary: int
    student: SideEncoding
    teacher: SideEncoding
    aligned_pairs: int
    optimum_pairs: int
    prompt_truncated: bool
    response_truncated: bool


def _unique_sorted(values: np.ndarray) -> np.ndarray:
    """np.unique for an already sorted array (without its sort)."""
    if values.size == 0:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _content_mask(spans: TokenSpans) -> np.ndarray:
    """Tokens that stand for text (special tokens such as BOS, and a dummy prefix, have an empty span)."""
    return np.asarray(spans.ends) > np.asarray(spans.starts)


@dataclass(frozen=True)
class _TokenizerInfo:
    eos_id: int
    special: np.ndarray  # bool [len(tokenizer)]: the id is a special token

    @classmethod
    def of(cls, tokenizer: Any) -> _TokenizerInfo:
        special = np.zeros(len(tokenizer), dtype=bool)
        special[[i for i in tokenizer.all_special_ids if i < special.size]] = True
        return cls(int(tokenizer.eos_token_id), special)


class RowBuilder:
    """Builds rows for one teacher/student tokenizer pair (create once per worker process)."""

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, max_length: int) -> None:
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        # Per-tokenizer constants looked up on every row (transformers' special-token attributes are slow).
        self._info = {id(tok): _TokenizerInfo.of(tok) for tok in (teacher_tokenizer, student_tokenizer)}

    def _encode(self, text: str) -> tuple[TokenSpans, TokenSpans]:
        return encode_with_spans(self.teacher_tokenizer, text), encode_with_spans(self.student_tokenizer, text)

    def _both_fit(self, pair: tuple[TokenSpans, TokenSpans], with_eos: bool) -> bool:
        return (self._fits(pair[0], self.teacher_tokenizer, with_eos)
                and self._fits(pair[1], self.student_tokenizer, with_eos))

    @property
    def _tokenizers(self) -> tuple[Any, Any]:
        return self.teacher_tokenizer, self.student_tokenizer

    def _fits(self, spans: TokenSpans, tokenizer: Any, with_eos: bool) -> bool:
        if spans.ids.size < self.max_length:  # fits even with an EOS appended
            return True
        appended = int(with_eos and not self._has_final_eos(spans, tokenizer))
        return spans.ids.size + appended <= self.max_length

    def _has_final_eos(self, spans: TokenSpans, tokenizer: Any) -> bool:
        """Whether the tokenizer itself already appended EOS (e.g. ``add_eos_token=True``)."""
        ids = spans.ids
        eos = self._info[id(tokenizer)].eos_id
        return bool(ids.size and ids[-1] == eos and spans.ends[-1] == spans.starts[-1])

    def _prompt_cut_candidates(self, pair: tuple[TokenSpans, TokenSpans], boundary: int) -> tuple[np.ndarray, bool]:
        """Character positions in [lowest useful cut, boundary) that start a token on both sides, and whether
        the response alone is expected to fit (judged from the joint encoding, verified by re-encoding)."""
        lowest = 0
        common = None
        for spans, tokenizer in zip(pair, self._tokenizers, strict=True):
            content = _content_mask(spans)
            starts = np.sort(spans.starts[content])
            specials = spans.ids.size - starts.size + int(not self._has_final_eos(spans, tokenizer))
            unique_starts = _unique_sorted(starts)
            kept_after_cut = starts.size - np.searchsorted(starts, unique_starts, side="left")
            fitting = unique_starts[kept_after_cut <= self.max_length - specials]
            lowest = max(lowest, int(fitting[0]) if fitting.size else len(spans.ids) + boundary + 1)
            common = unique_starts if common is None else np.intersect1d(common, unique_starts, assume_unique=True)
        return common[(common >= lowest) & (common < boundary)], lowest <= boundary

    def _response_cut_candidates(self, pair: tuple[TokenSpans, TokenSpans], offset: int) -> np.ndarray:
        """Response-relative positions ending a token on both sides (tokens starting at or after ``offset`` in
        ``pair``'s text), largest first, where both sides are expected to fit without EOS."""
        highest = None
        common = None
        for spans in pair:
            content = _content_mask(spans)
            ends = np.sort(spans.ends[content & (spans.starts >= offset)]) - offset
            budget = self.max_length - (spans.ids.size - int(content.sum()))
            unique_ends = _unique_sorted(ends)
            kept_before_cut = np.searchsorted(ends, unique_ends, side="right")
            fitting = unique_ends[kept_before_cut <= budget]
            limit = int(fitting[-1]) if fitting.size else 0
            highest = limit if highest is None else min(highest, limit)
            common = unique_ends if common is None else np.intersect1d(common, unique_ends, assume_unique=True)
        candidates = common[(common > 0) & (common <= highest)]
        return candidates[::-1]

    def _truncate(self, prompt: str, response: str, pair: tuple[TokenSpans, TokenSpans]):
        """Apply the truncation policy; returns (prompt, response, pair, prompt_truncated, response_truncated).

        Cut positions are chosen from the joint encoding and every choice is verified by re-encoding the cut
        text on both sides (a cut can change the tokens next to it); a failed check moves to the next one.
        """
        boundary = len(prompt)
        candidates, response_may_fit = self._prompt_cut_candidates(pair, boundary)
        if response_may_fit:
            # A few common token starts, then the response start itself.
            for cut in [*candidates[: _MAX_CUT_ATTEMPTS - 1], boundary]:
                cut_pair = pair if cut == 0 else self._encode(prompt[cut:] + response)
                if self._both_fit(cut_pair, with_eos=True):
                    return prompt[cut:], response, cut_pair, cut > 0, False
        # The response alone is too long: cut it from the right (positions from the joint encoding's response).
        for attempt, end in enumerate(self._response_cut_candidates(pair, boundary)):
            cut_pair = self._encode(response[:end])
            if self._both_fit(cut_pair, with_eos=False):
                return "", response[:end], cut_pair, bool(prompt), True
            if attempt >= _MAX_CUT_ATTEMPTS:
                break
        raise ValueError(f"cannot fit the response into max_length={self.max_length} tokens on both sides")

    def _side(self, spans: TokenSpans, tokenizer: Any, boundary: int, text_length: int, with_eos: bool) -> SideEncoding:
        info = self._info[id(tokenizer)]
        special = info.special[spans.ids]
        content = ~special
        straddles = int(np.count_nonzero(content & (spans.starts < boundary) & (spans.ends > boundary)))
        final_eos = with_eos and self._has_final_eos(spans, tokenizer)
        size = spans.ids.size + int(with_eos and not final_eos)
        ids, starts, ends = (np.full(size, info.eos_id, dtype=np.int64), np.full(size, text_length, dtype=np.int64),
                             np.full(size, text_length, dtype=np.int64))
        response, alignable = np.ones(size, dtype=bool), np.zeros(size, dtype=bool)
        count = spans.ids.size
        ids[:count], starts[:count], ends[:count] = spans.ids, spans.starts, spans.ends
        alignable[:count] = spans.alignable
        response[:count] = content & (spans.starts >= boundary)
        if final_eos:
            response[-1] = True
        return SideEncoding(ids, starts, ends, response, alignable, straddles)

    def build_many(self, examples: list[tuple[str, str]]) -> list[RowResult]:
        """``[build(prompt, response) for ...]`` with one tokenizer batch call per side and the row logic
        vectorised over all examples (``prealign_batch``); the rows are identical to ``build``'s."""
        from dskd_scale.data.prealign_batch import build_rows

        return build_rows(self, examples)

    def build(self, prompt: str, response: str, *, pair: tuple[TokenSpans, TokenSpans] | None = None) -> RowResult:
        """Tokenise, truncate and align one example (see the module docstring for the policy).

        Args:
            prompt, response: the example's texts; the model sees ``prompt + response``.
            pair: (teacher, student) ``encode_with_spans`` of ``prompt + response`` when already computed.

        Raises:
            ValueError: the response cannot be made to fit ``max_length`` (only with absurdly small limits).
        """
        pair = pair or self._encode(prompt + response)
        prompt_truncated = response_truncated = False
        if not self._both_fit(pair, with_eos=True):
            prompt, response, pair, prompt_truncated, response_truncated = self._truncate(prompt, response, pair)
        text = prompt + response
        boundary = len(prompt)
        with_eos = not response_truncated
        teacher = self._side(pair[0], self.teacher_tokenizer, boundary, len(text), with_eos)
        student = self._side(pair[1], self.student_tokenizer, boundary, len(text), with_eos)

        # Align only the response tokens: prompt tokens are never pairs, and it saves work on long prompts.
        student_positions = np.flatnonzero(student.response[: len(pair[1].ids)])
        teacher_positions = np.flatnonzero(teacher.response[: len(pair[0].ids)])
        idx_student, idx_teacher = exact_token_alignment(
            _subset(pair[1], student_positions), _subset(pair[0], teacher_positions)
        )
        align_student = student_positions[np.asarray(idx_student, dtype=np.int64)]
        align_teacher = teacher_positions[np.asarray(idx_teacher, dtype=np.int64)]
        if with_eos:
            align_student = np.append(align_student, student.ids.size - 1)
            align_teacher = np.append(align_teacher, teacher.ids.size - 1)
        predictable = (align_student >= 1) & (align_teacher >= 1)
        align_student, align_teacher = align_student[predictable], align_teacher[predictable]

        columns = {
            "student_input_ids": student.ids.astype(np.int32),
            "teacher_input_ids": teacher.ids.astype(np.int32),
            "student_labels": np.where(student.response, student.ids, IGNORE_INDEX).astype(np.int32),
            "teacher_labels": np.where(teacher.response, teacher.ids, IGNORE_INDEX).astype(np.int32),
            "align_student": align_student.astype(np.int32),
            "align_teacher": align_teacher.astype(np.int32),
        }
        return RowResult(
            columns=columns,
            text=text,
            boundary=boundary,
            student=student,
            teacher=teacher,
            aligned_pairs=int(align_student.size),
            optimum_pairs=_exact_span_optimum(student, teacher, identical=_identical(pair)),
            prompt_truncated=prompt_truncated,
            response_truncated=response_truncated,
        )


def _subset(spans: TokenSpans, positions: np.ndarray) -> TokenSpans:
    """The tokens of ``spans`` at ``positions``, as a TokenSpans over the same text."""
    return dataclasses.replace(
        spans,
        ids=np.asarray(spans.ids)[positions],
        starts=np.asarray(spans.starts)[positions],
        ends=np.asarray(spans.ends)[positions],
        alignable=np.asarray(spans.alignable)[positions],
    )


def _identical(pair: tuple[TokenSpans, TokenSpans]) -> bool:
    return pair[0].fingerprint == pair[1].fingerprint and np.array_equal(pair[0].ids, pair[1].ids)


def _exact_span_optimum(student: SideEncoding, teacher: SideEncoding, *, identical: bool) -> int:
    """Upper bound for any exact alignment: alignable response tokens (position >= 1) whose character span
    equals an alignable teacher response token's span, plus the EOS pair. With identical tokenizers every
    response token covering text pairs with itself (pieces of one multi-byte character included)."""
    if identical:
        usable = student.response & (student.ends > student.starts) & (np.arange(student.ids.size) >= 1)
        return int(usable.sum()) + int(student.ids.size >= 2 and student.response[-1] and
                                       student.ends[-1] == student.starts[-1])
    stride = int(max(student.ends.max(initial=0), teacher.ends.max(initial=0))) + 1
    keys = []
    for side in (student, teacher):
        usable = side.response & side.alignable & (np.arange(side.ids.size) >= 1)
        keys.append((side.starts * stride + side.ends)[usable])
    shared = np.intersect1d(keys[0], keys[1], assume_unique=True)  # alignable spans never overlap
    eos_pair = int(
        student.ids.size >= 2 and teacher.ids.size >= 2 and student.response[-1] and teacher.response[-1]
        and student.ends[-1] == student.starts[-1] and teacher.ends[-1] == teacher.starts[-1]
    )
    return int(shared.size) + eos_pair
