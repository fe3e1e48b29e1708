"""Online exact token alignment of student rollouts: the student's sampled ids against the teacher's tokenisation
of the same text, through the code path offline prealignment uses (``alignment.batch``).

Per row: the student sequence is ``prompt_ids + response_ids`` exactly as given (never re-tokenised). The
response text is the longest run of leading response tokens whose bytes are valid UTF-8, so it ends on a token and
a character boundary: a sampled byte-fallback or partial UTF-8 token at the end (or an invalid byte sequence
anywhere) cannot produce a wrong pair, as tokens after the cut get no pair. The teacher tokenises
``prompt + response text`` jointly with its special tokens and gets EOS appended, as ``tools/prealign.py`` does for
gold data. A response ending in the student's EOS (and not cut) pairs EOS with EOS; one that hit
``max_new_tokens`` has no EOS pair. An empty response (no text before the cut) gets no pair at all. With the same
tokenizer on both sides the teacher sequence is the student's and the alignment is the identity over all sampled
response tokens (no cut is needed: both sides read the same ids), as offline for identical tokenizations.

The prompt text must be the text the student prompt ids spell (``prompt_text`` gives it; a tokenizer's
``decode`` may clean up spaces); anything else is refused with an error naming the row. The response starts where
the prompt text ends, so a student token that straddled the prompt/response boundary of a prealigned row is
prompt here, and the teacher's response starts after it. Prompt truncation to a length limit is the caller's job
(the prompts come from prealigned shards, already truncated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd_scale.alignment.batch import align_flat, flatten_side
from dskd_scale.alignment.eta import check_whitespace_mode
from dskd_scale.alignment.spans import TokenSpans, encode_batch_with_spans, spans_from_ids
from dskd_scale.alignment.token_bytes import token_table


@dataclass
class RolloutRow:
    """One aligned rollout (L_s student tokens, L_t teacher tokens, A pairs)."""

    student_input_ids: np.ndarray  # int64 [L_s]: prompt_ids + response_ids, as given
    teacher_input_ids: np.ndarray  # int64 [L_t]: teacher tokenisation of text (+ EOS when the rollout ended)
    teacher_response: np.ndarray  # bool [L_t]: teacher response tokens (and its EOS), i.e. teacher label positions
    align_student: np.ndarray  # int64 [A], strictly increasing, >= 1
    align_teacher: np.ndarray  # int64 [A], strictly increasing, >= 1
    text: str  # prompt + the response text up to the cut
    boundary: int  # len(prompt) in characters
    ended_with_eos: bool  # the response's last sampled id is the student's EOS
    cut_tokens: int  # sampled response tokens (EOS excluded) at or after the cut: never paired
    empty: bool  # no response text: the row has no pair (and no EOS pair)


def _special_mask(tokenizer: Any) -> np.ndarray:
    special = np.zeros(len(tokenizer), dtype=bool)
    special[[i for i in tokenizer.all_special_ids if 0 <= i < special.size]] = True
    return special


def _cut_response(table: Any, response: np.ndarray, special: np.ndarray) -> tuple[str, int]:
    """(text, number of leading response tokens it consists of): the longest run of whole tokens whose bytes are
    valid UTF-8 (so it ends on both a token and a character boundary)."""
    stop = np.flatnonzero(special[response])
    content = response[: stop[0]] if stop.size else response  # nothing after a special token is text
    token_ends = np.cumsum(table.byte_lengths[content])
    raw = b"".join(table.bytes_array[content].tolist())
    whole = content.size
    while True:  # each failed decode moves the end back to an earlier token boundary (a few times at most)
        end = int(token_ends[whole - 1]) if whole else 0
        try:
            return raw[:end].decode("utf-8"), whole
        except UnicodeDecodeError as error:
            whole = int(np.searchsorted(token_ends, error.start, side="right"))


def prompt_text(tokenizer: Any, prompt_ids: Sequence[int]) -> str:
    """The text ``prompt_ids`` spell: their token bytes laid end to end, without a SentencePiece dummy prefix space
    (detected by re-encoding: the ids are what the tokenizer gives for the text without it)."""
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    table = token_table(tokenizer)
    text = b"".join(table.bytes_array[ids].tolist()).decode("utf-8")
    if text.startswith(" "):
        content = ids[table.byte_lengths[ids] >= 0].tolist()
        if tokenizer(text[1:], add_special_tokens=False)["input_ids"] == content:
            return text[1:]
    return text


def align_rollouts(teacher_tokenizer: Any, student_tokenizer: Any, prompts: Sequence[str],
                   prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                   whitespace: str = "exact") -> list[RolloutRow]:
    """Align a micro-batch of rollouts (see the module docstring); one entry per row, in order.

    Args:
        prompts: [R] prompt texts; ``prompt_ids``: [R] the student's prompt ids (BOS included) spelling them.
        response_ids: [R] sampled student ids, padding removed; a final student EOS marks a finished rollout.
        whitespace: ``"exact"`` or ``"paper"`` (``exact_token_alignment``); use the manifest's choice.
    """
    check_whitespace_mode(whitespace)
    if not len(prompts) == len(prompt_ids) == len(response_ids):
        raise ValueError(f"align_rollouts: {len(prompts)} prompts, {len(prompt_ids)} prompt id rows and "
                         f"{len(response_ids)} response rows")
    if not prompts:
        return []
    table = token_table(student_tokenizer, "student")
    student_special, teacher_special = _special_mask(student_tokenizer), _special_mask(teacher_tokenizer)
    student_eos, teacher_eos = int(student_tokenizer.eos_token_id), int(teacher_tokenizer.eos_token_id)
    texts, student_spans, sequences, ended, cut_tokens, empty = [], [], [], [], [], []
    for row, (prompt, prompt_row, response_row) in enumerate(zip(prompts, prompt_ids, response_ids, strict=True)):
        prompt_row = np.asarray(prompt_row, dtype=np.int64).reshape(-1)
        spelled = b"".join(table.bytes_array[prompt_row].tolist())  # special tokens spell b""
        if spelled not in (prompt.encode("utf-8"), b" " + prompt.encode("utf-8")):  # one dummy prefix space
            raise ValueError(f"align_rollouts: row {row}: the student prompt ids spell {spelled[:80]!r}, not the "
                             f"prompt text {prompt[:80]!r}; pass prompt_text(student_tokenizer, prompt_ids)")
        response = np.asarray(response_row, dtype=np.int64).reshape(-1)
        finished = bool(response.size and response[-1] == student_eos)
        body = response[:-1] if finished else response
        response_text, whole = _cut_response(table, body, student_special)
        text = prompt + response_text
        covered = spans_from_ids(student_tokenizer, text, np.concatenate([prompt_row, body[:whole]]), name="student")
        sequences.append(np.concatenate([prompt_row, response]))
        texts.append(text)
        student_spans.append(_with_uncovered_tail(covered, response[whole:]))
        cut_tokens.append(int(body.size - whole))
        ended.append(finished)
        empty.append(not response_text)
    if table.fingerprint == token_table(teacher_tokenizer, "teacher").fingerprint:
        return _identity_rows(prompt_ids, sequences, texts, prompts, ended, empty, cut_tokens)
    with_eos = np.array(ended) & ~np.array(empty) & (np.array(cut_tokens) == 0)
    teacher_spans = encode_batch_with_spans(teacher_tokenizer, texts)
    boundaries = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    # the teacher's EOS is appended only where the rollout finished; the student's sampled EOS is already there
    teacher = flatten_side(teacher_spans, boundaries, with_eos, teacher_eos, teacher_special)
    student = flatten_side(student_spans, boundaries, with_eos, student_eos, student_special)
    alignment = align_flat(student, teacher, with_eos, whitespace=whitespace)
    pairs_student, pairs_teacher = alignment.rows("align_student"), alignment.rows("align_teacher")
    teacher_ids, teacher_response = teacher.rows("ids"), teacher.rows("response")
    rows = []
    for i, text in enumerate(texts):
        rows.append(RolloutRow(
            student_input_ids=sequences[i], teacher_input_ids=teacher_ids[i].copy(),
            teacher_response=teacher_response[i].copy(), align_student=pairs_student[i].copy(),
            align_teacher=pairs_teacher[i].copy(), text=text, boundary=int(boundaries[i]),
            ended_with_eos=ended[i], cut_tokens=cut_tokens[i], empty=empty[i],
        ))
    return rows


def _identity_rows(prompt_ids: Sequence[Sequence[int]], sequences: list[np.ndarray], texts: list[str],
                   prompts: Sequence[str], ended: list[bool], empty: list[bool], cut_tokens: list[int],
                   ) -> list[RolloutRow]:
    """Same tokenizer on both sides: the teacher reads the student's sequence, and every sampled response token
    (pieces after a cut and the EOS included) pairs with itself; a response of no token but EOS has no pair."""
    rows = []
    for i, sequence in enumerate(sequences):
        first = len(prompt_ids[i])
        response = np.zeros(sequence.size, dtype=bool)
        response[first:] = True
        sampled = sequence.size - first - int(ended[i])  # response tokens before the EOS
        positions = np.arange(max(first, 1) if sampled else sequence.size, sequence.size, dtype=np.int64)
        rows.append(RolloutRow(
            student_input_ids=sequence, teacher_input_ids=sequence.copy(), teacher_response=response,
            align_student=positions, align_teacher=positions.copy(), text=texts[i], boundary=len(prompts[i]),
            ended_with_eos=ended[i], cut_tokens=cut_tokens[i], empty=empty[i],
        ))
    return rows


def _with_uncovered_tail(spans: TokenSpans, extra_ids: np.ndarray) -> TokenSpans:
    """``spans`` plus the sampled tokens after the cut (a final EOS included): empty spans at the text end, never
    alignable, so they get no pair (a final EOS pairs only through ``with_eos``)."""
    tail = extra_ids.size
    if tail == 0:
        return spans
    end_char, end_byte = spans.text_length, spans.num_bytes
    fill = np.full(tail, end_char, dtype=np.int64)
    fill_bytes = np.full(tail, end_byte, dtype=np.int64)
    return TokenSpans(
        ids=np.concatenate([spans.ids, extra_ids]), starts=np.concatenate([spans.starts, fill]),
        ends=np.concatenate([spans.ends, fill]), alignable=np.concatenate([spans.alignable, np.zeros(tail, bool)]),
        text_length=spans.text_length, fingerprint=spans.fingerprint,
        byte_starts=np.concatenate([spans.byte_starts, fill_bytes]),
        byte_ends=np.concatenate([spans.byte_ends, fill_bytes]),
        word_starts=np.concatenate([spans.word_starts, fill_bytes]), num_bytes=spans.num_bytes,
    )
