"""GSM8K final-answer extraction on a table of tricky answers."""

from __future__ import annotations

import json

import pytest

from dskd_scale.eval.answers import canonical_number, extract_final_number, gsm8k_reference_answer

TRICKY = [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("#### 1,600", "1600"),
    ("so the total is 1,234,567.", "1234567"),
    ("The answer is $18.00.", "18"),
    ("The answer is: 42 apples", "42"),
    ("It costs 12.50 dollars.", "12.5"),
    ("That is 75%.", "75"),
    ("He ends with -5 points.", "-5"),
    ("Between 3-5 apples, so 5", "5"),
    ("first 10, then 20, finally 30.", "30"),
    ("#### 7\n\nQuestion: a new question with 99", "7"),
    ("The answer is 8. Check: 2 + 6 = 8, and 3 more is 11", "8"),
    ("therefore \\boxed{144} is the result of 12*12", "144"),
    ("it costs .5 dollars", "0.5"),
    ("the final answer is 3.0", "3"),
    ("no digits at all", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), TRICKY)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_canonical_number_forms():
    assert canonical_number("1,600.00") == canonical_number("$1600") == canonical_number("1600.") == "1600"
    assert canonical_number("0.250") == "0.25"
    assert canonical_number("abc") is None


def test_every_gsm8k_test_reference_parses_and_self_extracts(asset):
    rows = [json.loads(line) for line in asset("data/gsm8k/test.jsonl").read_text().splitlines()]
    for row in rows:
        reference = gsm8k_reference_answer(row["answer"])
        assert extract_final_number(row["answer"]) == reference
    with pytest.raises(ValueError, match="no '#### <number>'"):
        gsm8k_reference_answer("the answer is 5")
