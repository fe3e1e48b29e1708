"""Contract 1 on real tokenizer pairs over Dolly, the truncation policy, boundary tokens, identity alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dskd_scale.data.format import IGNORE_INDEX
from dskd_scale.prealign.batch_rows import build_rows
from dskd_scale.prealign.rows import RowBuilder

pytestmark = pytest.mark.assets

def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


PAIRS = [("tokenizers/gpt2", "tokenizers/llama2"), ("tokenizers/qwen1.5", "tokenizers/mistral")]


def check_contract(result, teacher, student, max_length: int, whitespace: str = "exact") -> None:
    """Every Contract 1 property of one row, checked against the row's own text."""
    columns, text, boundary = result.columns, result.text, result.boundary
    for side, tokenizer, encoding in (("student", student, result.student), ("teacher", teacher, result.teacher)):
        ids, labels = columns[f"{side}_input_ids"], columns[f"{side}_labels"]
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        assert ids.size == labels.size <= max_length
        # Labels are not shifted: the input id on response tokens, -100 elsewhere (prompt, BOS).
        response = labels != IGNORE_INDEX
        np.testing.assert_array_equal(labels[response], ids[response])
        np.testing.assert_array_equal(response, encoding.response)
        assert encoding.starts[response].min() >= boundary  # only tokens wholly inside the response
        # The same ids the tokenizer gives for the text, plus EOS.
        expected = tokenizer(text)["input_ids"]
        if not result.response_truncated:
            assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
            expected = expected + [tokenizer.eos_token_id]
        assert ids.tolist() == expected
        # The response tokens cover the response without gaps (pieces of one character may overlap).
        starts, ends = encoding.starts[response], encoding.ends[response]
        order = np.argsort(starts, kind="stable")
        covered_until = np.maximum.accumulate(ends[order])
        assert covered_until[-1] == len(text)
        assert starts[order][0] == boundary or encoding.straddles == 1  # a straddling token keeps its start
        assert np.all(starts[order][1:] <= covered_until[:-1])

    align_s, align_t = columns["align_student"], columns["align_teacher"]
    assert align_s.size == align_t.size == result.aligned_pairs
    assert np.all(np.diff(align_s) > 0) and np.all(np.diff(align_t) > 0)
    assert align_s.size == 0 or (align_s.min() >= 1 and align_t.min() >= 1)
    assert np.all(columns["student_labels"][align_s] != IGNORE_INDEX)
    assert np.all(columns["teacher_labels"][align_t] != IGNORE_INDEX)
    s, t = result.student, result.teacher
    # Aligned tokens cover exactly the same bytes (so characters) of the same text, in paper mode once leading
    # spaces are removed; EOS pairs with EOS only.
    data = text.encode("utf-8")
    stripped = [[data[a:b].lstrip(b" ") or data[a:b] for a, b in zip(side.byte_starts[align], side.byte_ends[align],
                                                                      strict=True)] for side, align in
                ((s, align_s), (t, align_t))]
    assert stripped[0] == stripped[1]
    np.testing.assert_array_equal(s.byte_ends[align_s], t.byte_ends[align_t])
    if whitespace == "exact":
        np.testing.assert_array_equal(s.byte_starts[align_s], t.byte_starts[align_t])
        np.testing.assert_array_equal(s.starts[align_s], t.starts[align_t])
        np.testing.assert_array_equal(s.ends[align_s], t.ends[align_t])
    s_eos = columns["student_input_ids"][align_s] == student.eos_token_id
    t_eos = columns["teacher_input_ids"][align_t] == teacher.eos_token_id
    np.testing.assert_array_equal(s_eos, t_eos)
    if not result.response_truncated:
        assert align_s[-1] == s.ids.size - 1 and align_t[-1] == t.ids.size - 1
    nonempty = s.ends[align_s] > s.starts[align_s]
    assert nonempty.sum() == align_s.size - int(not result.response_truncated)


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_contract_on_dolly(tokenizer, dolly_slice, teacher_name, student_name):
    teacher, student = tokenizer(teacher_name), tokenizer(student_name)
    rows = read_jsonl(dolly_slice(80))[::2]
    builder = RowBuilder(teacher, student, max_length=512)
    results = build_rows(builder, [(row["prompt"], row["output"]) for row in rows])
    for row, result in zip(rows, results, strict=True):
        if not (result.prompt_truncated or result.response_truncated):
            assert result.text == row["prompt"] + row["output"]
        check_contract(result, teacher, student, 512)
    aligned = sum(r.aligned_pairs for r in results)
    student_tokens = sum(int(r.student.response.sum()) for r in results)
    assert aligned >= 0.5 * student_tokens  # the pairs really align most of the text, not only EOS
    assert aligned == sum(r.optimum_pairs for r in results)  # ETA reaches the byte-span optimum


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_paper_whitespace_rows_contain_the_exact_rows_pairs(tokenizer, dolly_slice, teacher_name, student_name):
    teacher, student = tokenizer(teacher_name), tokenizer(student_name)
    examples = [(row["prompt"], row["output"]) for row in read_jsonl(dolly_slice(40))[::2]]
    exact = build_rows(RowBuilder(teacher, student, max_length=512), examples)
    paper = build_rows(RowBuilder(teacher, student, max_length=512, whitespace="paper"), examples)
    for e, p in zip(exact, paper, strict=True):
        check_contract(p, teacher, student, 512, whitespace="paper")
        np.testing.assert_array_equal(e.columns["student_input_ids"], p.columns["student_input_ids"])
        pairs_e = set(zip(e.columns["align_student"].tolist(), e.columns["align_teacher"].tolist(), strict=True))
        pairs_p = set(zip(p.columns["align_student"].tolist(), p.columns["align_teacher"].tolist(), strict=True))
        assert pairs_e <= pairs_p
        # each row reports what the other mode gives, and it is what the other mode gives
        assert (e.other_whitespace_pairs, p.other_whitespace_pairs) == (p.aligned_pairs, e.aligned_pairs)
        assert p.aligned_pairs == p.optimum_pairs


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_prompt_truncated_from_left_at_shared_position(tokenizer, dolly_slice, teacher_name, student_name):
    teacher, student = tokenizer(teacher_name), tokenizer(student_name)
    def tokens(tok, text):
        return len(tok(text)["input_ids"])

    rows = [r for r in read_jsonl(dolly_slice(80))
            if max(tokens(teacher, r["output"]), tokens(student, r["output"])) < 40
            and tokens(student, r["prompt"] + r["output"]) > 70][:6]
    assert len(rows) == 6
    builder = RowBuilder(teacher, student, max_length=64)
    for row in rows:
        result = builder.build(row["prompt"], row["output"])
        full = row["prompt"] + row["output"]
        assert result.prompt_truncated and not result.response_truncated
        # Both sides saw the same text: a suffix of the prompt followed by the whole response.
        assert result.text.endswith(row["output"]) and full.endswith(result.text)
        assert result.boundary == len(result.text) - len(row["output"]) > 0
        check_contract(result, teacher, student, 64)


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS)
def test_response_truncated_from_right_without_eos(tokenizer, dolly_slice, teacher_name, student_name):
    teacher, student = tokenizer(teacher_name), tokenizer(student_name)
    row = max(read_jsonl(dolly_slice(80)), key=lambda r: len(r["output"]))
    result = RowBuilder(teacher, student, max_length=40).build(row["prompt"], row["output"])
    assert result.response_truncated and result.boundary == 0
    assert row["output"].startswith(result.text) and len(result.text) < len(row["output"])
    assert result.columns["teacher_input_ids"][-1] != teacher.eos_token_id
    check_contract(result, teacher, student, 40)


def test_token_straddling_boundary_counts_as_prompt(tokenizer):
    teacher, student = tokenizer("tokenizers/qwen1.5"), tokenizer("tokenizers/mistral")
    # Qwen merges ":\n\n" into one token: the prompt's end and the response's first newline.
    result = RowBuilder(teacher, student, max_length=64).build("### Response:\n", "\nThe answer is yes.")
    t = result.teacher
    straddling = np.flatnonzero((t.starts < result.boundary) & (t.ends > result.boundary))
    assert straddling.size == 1 and t.straddles == 1
    assert result.columns["teacher_labels"][straddling[0]] == IGNORE_INDEX
    assert straddling[0] not in result.columns["align_teacher"]
    check_contract(result, teacher, student, 64)


def test_identical_tokenizers_align_every_response_token(tokenizer, dolly_slice):
    llama = tokenizer("tokenizers/llama2")
    rows = read_jsonl(dolly_slice(20))
    for result in build_rows(RowBuilder(llama, llama, max_length=512), [(r["prompt"], r["output"]) for r in rows]):
        response = np.flatnonzero(result.student.response)
        np.testing.assert_array_equal(result.columns["align_student"], response)
        np.testing.assert_array_equal(result.columns["align_teacher"], response)
        assert result.aligned_pairs == result.optimum_pairs


@pytest.mark.parametrize(("teacher_name", "student_name", "max_length"), [
    ("tokenizers/qwen1.5", "tokenizers/llama2", 100), ("tokenizers/mistral", "tokenizers/mistral", 512)])
def test_batched_rows_equal_row_by_row(tokenizer, dolly_slice, teacher_name, student_name, max_length):
    teacher, student = tokenizer(teacher_name), tokenizer(student_name)
    examples = [(r["prompt"], r["output"]) for r in read_jsonl(dolly_slice(80))[1::3]]
    builder = RowBuilder(teacher, student, max_length=max_length)
    batched = build_rows(builder, examples)
    assert max_length > 200 or sum(r.prompt_truncated for r in batched) > 5  # the truncation path is covered
    for fast, (prompt, response) in zip(batched, examples, strict=True):
        slow = builder.build(prompt, response)
        for name, column in slow.columns.items():
            assert fast.columns[name].dtype == column.dtype
            np.testing.assert_array_equal(fast.columns[name], column, err_msg=name)
        assert (fast.text, fast.boundary, fast.aligned_pairs, fast.optimum_pairs) == (
            slow.text, slow.boundary, slow.aligned_pairs, slow.optimum_pairs)
        assert (fast.prompt_truncated, fast.response_truncated) == (slow.prompt_truncated, slow.response_truncated)
        for fast_side, slow_side in ((fast.student, slow.student), (fast.teacher, slow.teacher)):
            for field in ("ids", "starts", "ends", "response", "alignable", "byte_starts", "byte_ends", "word_starts"):
                np.testing.assert_array_equal(getattr(fast_side, field), getattr(slow_side, field), err_msg=field)
            assert fast_side.straddles == slow_side.straddles
