"""tools/demo.py's seed-averaged table: means and sample standard deviations of the evaluated runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_demo():
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_run(root: Path, name: str, rouge: float, exact: float, eval_ces: list[float]) -> tuple[Path, Path]:
    from dskd_scale.eval.results import RESULTS_FORMAT, RESULTS_FORMAT_VERSION

    run_dir = root / name
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step, ce in enumerate(eval_ces):
            handle.write(json.dumps({"step": step, "train/ce": 9.0}) + "\n")
            handle.write(json.dumps({"step": step, "eval/ce": ce}) + "\n")
    results = root / f"{name}.json"
    results.write_text(json.dumps({"format": RESULTS_FORMAT, "format_version": RESULTS_FORMAT_VERSION,
                                   "suites": {"demo": {"metrics": {"rougeL": rouge, "exact_match": exact}}}}))
    return results, run_dir


def test_summary_averages_seeds_and_takes_the_last_eval_ce(tmp_path):
    demo = load_demo()
    a = fake_run(tmp_path, "a", 10.0, 0.0, [3.0, 2.0])
    b = fake_run(tmp_path, "b", 14.0, 5.0, [2.5, 1.0])
    t = fake_run(tmp_path, "t", 50.0, 20.0, [])
    summary = demo.summarise({"student": [(10, *a), (20, *b)], "teacher": [(10, t[0], None)]})
    student = summary["student"]
    assert student["seeds"] == [10, 20]
    assert student["rouge_l"] == pytest.approx(12.0)
    assert student["rouge_l_std"] == pytest.approx(2.0 ** 1.5)  # sample std of (10, 14) = sqrt(8)
    assert student["exact_match"] == pytest.approx(2.5)
    assert student["eval_ce"] == pytest.approx(1.5)  # last logged eval/ce of each run: 2.0 and 1.0
    teacher = summary["teacher"]
    assert teacher["rouge_l"] == 50.0 and teacher["rouge_l_std"] == 0.0 and teacher["eval_ce"] is None


def test_exact_match_by_task_reads_the_records_and_averages_seeds(tmp_path):
    from dskd_scale.eval.results import RESULTS_FORMAT, RESULTS_FORMAT_VERSION

    demo = load_demo()
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps({"task": task}) + "\n" for task in ("flag", "capital", "flag", "flag")))

    def fake_eval(name: str, hits: list[float]) -> Path:
        records = tmp_path / f"{name}_records"
        records.mkdir()
        # Records in another order than the test rows: the task is looked up by each record's index.
        order = [1, 3, 0, 2]
        (records / "demo.greedy.jsonl").write_text(
            "".join(json.dumps({"index": i, "exact_match": hits[i]}) + "\n" for i in order))
        results = tmp_path / f"{name}.json"
        results.write_text(json.dumps({"format": RESULTS_FORMAT, "format_version": RESULTS_FORMAT_VERSION,
                                       "records_dir": str(records),
                                       "suites": {"demo": {"metrics": {"rougeL": 1.0, "exact_match": 1.0}}}}))
        return results

    first = fake_eval("s10", [100.0, 0.0, 0.0, 100.0])   # flag 2/3, capital 0/1
    second = fake_eval("s20", [100.0, 100.0, 100.0, 100.0])
    tasks = ["flag", "capital", "flag", "flag"]
    assert demo.exact_match_by_task(tmp_path / "s10_records", tasks) == pytest.approx({"capital": 0.0, "flag": 200 / 3})
    summary = demo.summarise({"student": [(10, first, None), (20, second, None)]}, test_file)
    assert summary["student"]["exact_match_by_task"] == pytest.approx({"capital": 50.0, "flag": (200 / 3 + 100) / 2})
