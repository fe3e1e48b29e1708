"""tools/compare_results.py --format md|csv|text [--out FILE]: the same comparison in each format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from tool_support import run_tool

from dskd_scale.eval.results import RESULTS_FORMAT


def results(dolly: float, dolly_std: float, vicuna: float, gsm8k: float | None, examples: int = 4) -> dict:
    def suite(kind: str, metric: str, value: float, std: float) -> dict:
        return {"kind": kind, "metrics": {metric: value, f"{metric}_std": std}, "runs": {"10": {}},
                "num_examples": examples, "decoding": {"seeds": [10]}}

    suites = {"dolly": suite("instruction", "rougeL", dolly, dolly_std),
              "vicuna": suite("instruction", "rougeL", vicuna, 0.0)}
    if gsm8k is not None:
        suites["gsm8k"] = suite("math", "accuracy", gsm8k, 0.0)
    return {"format": RESULTS_FORMAT, "format_version": 1, "suites": suites}


@pytest.fixture
def files(tmp_path: Path) -> list[str]:
    paths = []
    for name, data in (("sft", results(20.0, 1.5, 10.0, 50.0)), ("dskd", results(23.5, 0.0, 11.0, None, examples=3))):
        path = tmp_path / name / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps(data))
        paths.append(str(path))
    return paths


def test_csv_has_plain_numbers_stds_and_deltas(files, tmp_path) -> None:
    out = tmp_path / "tables" / "cmp.csv"
    done = run_tool("compare_results.py", *files, "--labels", "SFT,DSKD", "--format", "csv", "--out", str(out))
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == ["suite", "metric", "SFT", "SFT_std", "DSKD", "DSKD_std", "delta_DSKD"]
    by_suite = {row["suite"]: row for row in rows}
    assert float(by_suite["dolly"]["SFT"]) == 20.0 and float(by_suite["dolly"]["SFT_std"]) == 1.5
    assert float(by_suite["dolly"]["delta_DSKD"]) == pytest.approx(3.5)
    assert by_suite["gsm8k"]["DSKD"] == "" and by_suite["gsm8k"]["delta_DSKD"] == ""  # DSKD has no gsm8k
    # The instruction average over the suites both files have: (20+10)/2 vs (23.5+11)/2.
    assert float(by_suite["avg(dolly,vicuna)"]["SFT"]) == pytest.approx(15.0)
    assert float(by_suite["avg(dolly,vicuna)"]["delta_DSKD"]) == pytest.approx(2.25)
    # Notes (3 vs 4 examples) stay out of the machine-readable file and go to stderr.
    assert "note:" not in out.read_text() and "dolly: DSKD has 3 examples" in done.stderr


def test_markdown_is_a_table_with_one_row_per_suite_metric(files) -> None:
    done = run_tool("compare_results.py", *files, "--format", "md")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "| suite | metric | sft | dskd | Δ dskd |"
    assert lines[1] == "| --- | --- | ---: | ---: | ---: |"
    assert "| dolly | rougeL | 20.00 ± 1.50 | 23.50 | +3.50 |" in lines
    assert "| gsm8k | accuracy | 50.00 | - | - |" in lines
    assert "| avg(dolly,vicuna) | rougeL | 15.00 | 17.25 | +2.25 |" in lines
    assert len(lines) == 2 + 4 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert "note: dolly: dskd has 3 examples" in done.stderr


def test_text_is_the_default_and_keeps_notes_inline(files) -> None:
    done = run_tool("compare_results.py", *files)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:4] == ["suite", "metric", "sft", "dskd"]
    assert "note: dolly: dskd has 3 examples" in done.stdout
