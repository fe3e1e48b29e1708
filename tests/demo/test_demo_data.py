"""The demo's generated data: clean splits for the teacher, validation and test; a small noisy student set."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dskd_scale.demo.data import TASKS, corrupt_output, make_demo_data, make_fact_table, make_split

ROOT = Path(__file__).resolve().parents[2]


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_student_set_has_the_asked_noise_and_the_other_splits_none(tmp_path):
    paths = make_demo_data(tmp_path, train=300, valid=50, test=50, student_train=2000, label_noise=0.4)
    for split in ("train", "valid", "test"):
        assert not any(row.get("noisy") for row in read_rows(paths[split])), split
    student = read_rows(paths["student_train"])
    noisy = sum(bool(row.get("noisy")) for row in student)
    # Binomial(2000, 0.4): sd ~ 22, so +-110 is a 5-sigma band.
    assert abs(noisy - 800) < 110
    assert {row["task"] for row in student} == set(TASKS)


def test_same_seed_same_bytes_and_clean_splits_do_not_depend_on_the_student_set(tmp_path):
    first = make_demo_data(tmp_path / "a", train=40, valid=5, test=5, student_train=30, label_noise=0.4)
    second = make_demo_data(tmp_path / "b", train=40, valid=5, test=5, student_train=30, label_noise=0.4)
    without = make_demo_data(tmp_path / "c", train=40, valid=5, test=5)
    for split in ("train", "valid", "test", "student_train"):
        assert first[split].read_bytes() == second[split].read_bytes(), split
    for split in ("train", "valid", "test"):
        assert first[split].read_bytes() == without[split].read_bytes(), split
    assert "student_train" not in without


def test_every_corrupted_answer_is_wrong_and_keeps_its_task_shape():
    rng = random.Random(5)
    table = make_fact_table(rng, 24)
    rows = make_split(random.Random(6), table, 400)
    for row in rows:
        wrong = corrupt_output(row["task"], row["instruction"], row["input"], row["output"], rng, table)
        assert wrong != row["output"], row
        if row["task"] == "fact":
            # Same sentence, only the final value replaced by another value of the same field.
            head, value = row["output"].rsplit(" ", 1)
            assert wrong.startswith(head + " ") and wrong.endswith(".") and wrong.rsplit(" ", 1)[1] != value
        elif row["task"] == "arithmetic":
            expression, result = row["output"].rsplit(" = ", 1)
            wrong_expression, wrong_result = wrong.rsplit(" = ", 1)
            assert wrong_expression == expression and 1 <= abs(int(wrong_result) - int(result)) <= 3
        elif row["task"] == "reverse":
            assert wrong.split() == list(reversed(row["output"].split()))
        else:  # list, upper: the input left as it was
            assert wrong == row["input"]


@pytest.mark.parametrize("flags", [["--label-noise", "1.0"], ["--student-train", "-1"], ["--test", "0"]])
def test_make_demo_assets_refuses_bad_flags_with_status_2(tmp_path, flags):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_assets.py"), "--out", str(tmp_path),
                             *flags], capture_output=True, text=True)
    assert result.returncode == 2
    assert flags[0] in result.stderr
