"""The demo's knowledge dataset: facts the teacher learns cleanly, a small student set with wrong facts."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dskd_scale.demo.knowledge import (
    KNOWLEDGE_TASKS,
    OPPOSITE_PAIRS,
    knowledge_row,
    make_knowledge_data,
    make_knowledge_split,
    make_world,
)

ROOT = Path(__file__).resolve().parents[2]


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def key_and_value(row: dict) -> tuple[str, str]:
    """Parse a row back into (key, answered value), independently of the generator's tables."""
    key = row["instruction"].removesuffix("?").removesuffix(".").rsplit(" ", 1)[1]
    value = row["output"].removesuffix(".").rsplit(" ", 1)[1]
    return key, value


def test_a_row_is_the_short_template_and_a_sentence_that_does_not_repeat_the_key():
    row = knowledge_row("capital", "Kalodal", "Venta", 1)
    assert row == {"task": "capital", "instruction": "Name the capital city of Kalodal.", "input": "",
                   "prompt": "### Instruction:\nName the capital city of Kalodal.\n\n### Response:\n",
                   "output": "Its capital is Venta."}
    assert knowledge_row("opposite", "hot", "cold", 0)["output"] == "The opposite is cold."


def test_student_set_has_the_asked_noise_and_the_clean_splits_answer_every_key_one_way(tmp_path):
    paths = make_knowledge_data(tmp_path, train=3000, valid=200, test=200, student_train=2000, label_noise=0.4)
    answers: dict[tuple[str, str], set[str]] = {}
    for split in ("train", "valid", "test"):
        rows = read_rows(paths[split])
        assert not any(row.get("noisy") for row in rows), split
        for row in rows:
            key, value = key_and_value(row)
            assert key not in row["output"], row  # nothing to copy from the prompt
            answers.setdefault((row["task"], key), set()).add(value)
    assert all(len(values) == 1 for values in answers.values())  # a fact has one answer in every clean split
    student = read_rows(paths["student_train"])
    noisy = [row for row in student if row.get("noisy")]
    # Binomial(2000, 0.4): sd ~ 22, so +-110 is a 5-sigma band.
    assert abs(len(noisy) - 800) < 110
    assert {row["task"] for row in student} == set(KNOWLEDGE_TASKS)
    for row in student:
        key, value = key_and_value(row)
        (truth,) = answers[(row["task"], key)]
        assert (value != truth) == bool(row.get("noisy")), row
        if row.get("noisy"):  # wrong, but a value some other key of the same task really has
            assert value in {v for (task, _), vs in answers.items() if task == row["task"] for v in vs}, row


def test_every_fact_the_test_split_asks_is_in_the_teachers_set(tmp_path):
    paths = make_knowledge_data(tmp_path, student_train=600, label_noise=0.4)  # the demo's sizes
    taught = {(row["task"], key_and_value(row)[0]) for row in read_rows(paths["train"])}
    for split in ("valid", "test", "student_train"):
        asked = {(row["task"], key_and_value(row)[0]) for row in read_rows(paths[split])}
        assert asked <= taught, (split, sorted(asked - taught)[:5])


def test_same_seed_same_bytes_and_clean_splits_do_not_depend_on_the_student_set(tmp_path):
    first = make_knowledge_data(tmp_path / "a", train=40, valid=5, test=5, student_train=30, label_noise=0.4)
    second = make_knowledge_data(tmp_path / "b", train=40, valid=5, test=5, student_train=30, label_noise=0.4)
    without = make_knowledge_data(tmp_path / "c", train=40, valid=5, test=5)
    other_seed = make_knowledge_data(tmp_path / "d", seed=99, train=40, valid=5, test=5)
    for split in ("train", "valid", "test", "student_train"):
        assert first[split].read_bytes() == second[split].read_bytes(), split
    for split in ("train", "valid", "test"):
        assert first[split].read_bytes() == without[split].read_bytes(), split
    assert first["train"].read_bytes() != other_seed["train"].read_bytes()
    assert "student_train" not in without


def test_world_has_both_directions_of_each_opposite_and_refuses_bad_sizes():
    world = make_world(random.Random(1), countries=5, opposite_pairs=3)
    assert world.facts("opposite") == {"hot": "cold", "cold": "hot", "big": "small", "small": "big",
                                       "fast": "slow", "slow": "fast"}
    assert len(world.facts("capital")) == 5
    with pytest.raises(ValueError, match="opposite_pairs"):
        make_world(random.Random(1), countries=5, opposite_pairs=len(OPPOSITE_PAIRS) + 1)
    with pytest.raises(ValueError, match="unknown demo task"):
        world.facts("arithmetic")
    with pytest.raises(ValueError, match="label_noise"):
        make_knowledge_split(random.Random(1), world, 3, label_noise=1.0)


def test_make_demo_assets_refuses_an_unknown_dataset_with_status_2(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_assets.py"), "--out", str(tmp_path),
                             "--dataset", "trivia"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--dataset" in result.stderr
