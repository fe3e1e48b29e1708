"""One instruction example -> one prealigned row (Contract 1), with the truncation policy.

Each tokenizer encodes ``prompt + response`` jointly (with its own BOS, if it adds one) and gets its EOS
appended. A token is a *response token* only if its whole character span lies inside the response; a token
straddling the prompt/response boundary (e.g. a merged ``":\\n"`` piece) counts as prompt: label −100, never
aligned, counted in ``boundary_straddles_<side>``. Aligned pairs come from exact token alignment over the
response tokens (identical byte spans, or identical once leading spaces are removed with ``whitespace="paper"``),
plus EOS↔EOS; pairs touching position 0 are dropped because no position predicts them. The alignment itself is
``dskd_scale.alignment.batch``, the code path online alignment of student rollouts uses too.

Truncation policy (``TRUNCATION_POLICY``), applied when either side exceeds ``max_length`` tokens:
1. cut the prompt from the left at the first character position that starts a token on *both* sides (or at
   the response start) such that both sides fit, so teacher and student always see the same text;
2. if the response alone does not fit, drop the prompt and cut the response from the right at a position
   that ends a token on both sides; such a row gets no EOS (the answer did not end there).
Both cases are counted (``prompt_truncated``, ``response_truncated``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd_scale.alignment import TokenSpans, encode_with_spans
from dskd_scale.alignment.batch import FlatSide, align_flat, flatten_side, identical_rows, span_optimum
from dskd_scale.alignment.eta import WHITESPACE_MODES, check_whitespace_mode
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
    ``alignable [L]`` bool, tokens covering bytes no other token covers (``TokenSpans.alignable``);
    ``byte_starts/byte_ends/word_starts [L]`` the byte spans (``TokenSpans``).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    response: np.ndarray
    alignable: np.ndarray
    straddles: int
    byte_starts: np.ndarray
    byte_ends: np.ndarray
    word_starts: np.ndarray


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
    other_whitespace_pairs: int  # pairs the other whitespace mode would give (its optimum)
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

    def __init__(self, teacher_tokenizer: Any, student_tokenizer: Any, max_length: int,
                 whitespace: str = "exact") -> None:
        if max_length < 4:
            raise ValueError(f"max_length must be >= 4, got {max_length}")
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_length = max_length
        self.whitespace = check_whitespace_mode(whitespace)
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
        return self.assemble([prompt], [response], [pair[0]], [pair[1]], np.array([prompt_truncated]),
                             np.array([response_truncated]))[0]

    def assemble(self, prompts: list[str], responses: list[str], teacher_spans: list[TokenSpans],
                 student_spans: list[TokenSpans], prompt_truncated: np.ndarray,
                 response_truncated: np.ndarray) -> list[RowResult]:
        """Rows of already tokenised (and truncated) examples, aligned all at once (``alignment.batch``)."""
        boundaries = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        with_eos = ~np.asarray(response_truncated, dtype=bool)
        sides = {}
        for name, tokenizer, spans in (("teacher", self.teacher_tokenizer, teacher_spans),
                                       ("student", self.student_tokenizer, student_spans)):
            info = self._info[id(tokenizer)]
            sides[name] = flatten_side(spans, boundaries, with_eos, info.eos_id, info.special)
        student, teacher = sides["student"], sides["teacher"]
        alignment = align_flat(student, teacher, with_eos, whitespace=self.whitespace)
        identical = identical_rows(teacher_spans, student_spans)
        optimum = span_optimum(student, teacher, identical, with_eos, whitespace=self.whitespace)
        other_mode = next(mode for mode in WHITESPACE_MODES if mode != self.whitespace)
        other = span_optimum(student, teacher, identical, with_eos, whitespace=other_mode)
        per_side = {name: _side_rows(side) for name, side in sides.items()}
        student_align = alignment.rows("align_student")
        teacher_align = alignment.rows("align_teacher")
        results = []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            s_side, s_ids32, s_labels = per_side["student"][i]
            t_side, t_ids32, t_labels = per_side["teacher"][i]
            results.append(RowResult(
                columns={"student_input_ids": s_ids32, "teacher_input_ids": t_ids32, "student_labels": s_labels,
                         "teacher_labels": t_labels, "align_student": student_align[i].astype(np.int32),
                         "align_teacher": teacher_align[i].astype(np.int32)},
                text=prompt + response,
                boundary=len(prompt),
                student=s_side,
                teacher=t_side,
                aligned_pairs=int(student_align[i].size),
                optimum_pairs=int(optimum[i]),
                other_whitespace_pairs=int(other[i]),
                prompt_truncated=bool(prompt_truncated[i]),
                response_truncated=bool(response_truncated[i]),
            ))
        return results


def _side_rows(side: FlatSide) -> list[tuple[SideEncoding, np.ndarray, np.ndarray]]:
    """Per row: the SideEncoding, int32 input ids and int32 labels (views into the flat arrays)."""
    labels = np.where(side.response, side.ids, IGNORE_INDEX).astype(np.int32)
    ids32 = side.ids.astype(np.int32)
    bounds = side.offsets.tolist()
    fields = ("ids", "starts", "ends", "response", "alignable", "byte_starts", "byte_ends", "word_starts")
    split = {name: side.rows(name) for name in fields}
    rows = []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        encoding = SideEncoding(split["ids"][i], split["starts"][i], split["ends"][i], split["response"][i],
                                split["alignable"][i], int(side.straddles[i]), split["byte_starts"][i],
                                split["byte_ends"][i], split["word_starts"][i])
        rows.append((encoding, ids32[start:end], labels[start:end]))
    return rows
