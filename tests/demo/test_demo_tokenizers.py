"""The demo's two tokenizers: where their response tokens cover the same characters (what exact alignment can pair).

Measured here from the tokenizers' own offsets, independently of ``dskd_scale.prealign``: a student response token
"matches" when a teacher token covers exactly the same characters (a leading space excluded on both sides).
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from dskd_scale.demo import build_demo_assets


def response_spans(tokenizer, prompt: str, output: str) -> set[tuple[int, int]]:
    text = prompt + output
    spans = set()
    for start, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]:
        if end > len(prompt):
            piece = text[start:end]
            spans.add((start + len(piece) - len(piece.lstrip(" ")), end))
    return spans


def matching(paths) -> tuple[float, float]:
    """(share of student response tokens with a teacher token over the same characters, share of responses whose
    first token has one)."""
    teacher = AutoTokenizer.from_pretrained(paths["teacher_tokenizer"])
    student = AutoTokenizer.from_pretrained(paths["student_tokenizer"])
    with open(paths["valid"], encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    matched = total = first = 0
    for row in rows:
        ours = response_spans(student, row["prompt"], row["output"])
        same = ours & response_spans(teacher, row["prompt"], row["output"])
        matched, total = matched + len(same), total + len(ours)
        first += any(start == len(row["prompt"]) for start, _ in same)
    return matched / total, first / len(rows)


@pytest.fixture(scope="module")
def both_styles(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_tokenizers")
    return {split: build_demo_assets(root / str(split), seed=7, train=400, valid=40, test=2,
                                     split_student_punctuation=split) for split in (False, True)}


def test_the_demo_student_tokenizer_tokenizes_responses_like_the_teacher(both_styles):
    # make demo's style: line-initial words have pieces of their own and full stops are split off, as in Llama's
    # SentencePiece, so every response token (the first one included) has an exact teacher counterpart here.
    share, first = matching(both_styles[True])
    assert share == 1.0 and first == 1.0


def test_the_fixture_style_keeps_its_unalignable_first_words(both_styles):
    # The test fixtures' hard case: the first response word falls apart into letters and "word." is one piece.
    share, first = matching(both_styles[False])
    assert share < 0.8 and first < 0.5


def test_the_two_demo_tokenizers_stay_different(both_styles):
    paths = both_styles[True]
    teacher = AutoTokenizer.from_pretrained(paths["teacher_tokenizer"])
    student = AutoTokenizer.from_pretrained(paths["student_tokenizer"])
    text = "### Response:\nThe capital of Kaveno is Rita."
    assert student.tokenize(text) != teacher.tokenize(text)
    assert student("x")["input_ids"][0] == student.bos_token_id  # BOS added, the teacher adds none
    assert teacher("x")["input_ids"][0] != teacher.bos_token_id
    assert "<0x0A>" in student.tokenize(text)  # newline by byte fallback
    with open(paths["valid"], encoding="utf-8") as handle:
        texts = [json.loads(line)["prompt"] + json.loads(line)["output"] for line in handle]
    for sample in texts:  # lossless
        assert student.decode(student(sample)["input_ids"], skip_special_tokens=True) == sample
