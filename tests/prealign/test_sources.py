"""Bad input handling: errors naming file:line, counted skips, empty responses, Dolly list outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dskd_scale.prealign.prompts import PromptFormat, RowRenderer
from dskd_scale.prealign.sources import PrealignInputError, count_drops, read_examples, scan_sources

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(prompt="Q: ", output="A.") -> str:
    return json.dumps({"prompt": prompt, "output": output})


def _read_all(sources, skip_bad_rows=False):
    total = sum(s.rows for s in sources)
    examples, drops, _ = read_examples(sources, [(0, total)], renderer=RowRenderer(PromptFormat()),
                                       skip_bad_rows=skip_bad_rows)
    return examples, drops


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"prompt": "x", "output": ', "not valid JSON"),
        ("[1, 2]", "a row must be an object, got list"),
        ('{"prompt": "x"}', "missing field 'output'"),
        ('{"prompt": 3, "output": "y"}', "field 'prompt' must be a string"),
        ('{"prompt": "x", "output": {"a": 1}}', "field 'output' must be a string"),
        ('{"prompt": "x", "output": [5]}', "field 'output' must be a string"),
    ],
)
def test_bad_row_error_names_file_and_line(tmp_path, bad_line, message):
    first = _write(tmp_path / "a.jsonl", [_row(), _row()])
    second = _write(tmp_path / "b.jsonl", [_row(), "", _row(), bad_line, _row()])
    with pytest.raises(PrealignInputError, match=rf"b\.jsonl:4: .*{message}") as caught:
        _read_all(scan_sources([first, second]))
    assert "--skip-bad-rows" in str(caught.value)


def test_skip_bad_rows_counts_every_reason_and_keeps_indices(tmp_path):
    path = _write(tmp_path / "mixed.jsonl", [
        _row(output="one"),
        "{broken",
        '{"prompt": "p"}',
        '{"prompt": "p", "output": 7}',
        _row(output="   \n"),
        _row(output=[]),
        _row(output=["first ref", "second ref"]),
        "",
        _row(output="last"),
    ])
    sources = scan_sources([path])
    assert sources[0].rows == 8  # the blank line has no example index
    examples, drops = _read_all(sources, skip_bad_rows=True)
    assert sorted(examples) == [0, 6, 7]
    assert examples[6].response == "first ref"  # Dolly multi-reference output: the first is the target
    assert examples[7].location.endswith("mixed.jsonl:9")
    assert count_drops(drops) == {"malformed_json": 1, "missing_field": 1, "non_string_field": 1,
                                  "empty_response": 2, "bad_messages": 0, "unused_field": 0}


def test_empty_response_is_dropped_even_without_skip(tmp_path):
    path = _write(tmp_path / "e.jsonl", [_row(output=""), _row(output="fine")])
    examples, drops = _read_all(scan_sources([path]), skip_bad_rows=False)
    assert list(examples) == [1] and drops == {0: "empty_response"}


def test_only_requested_index_ranges_are_parsed(tmp_path):
    # A bad row outside the requested range belongs to another rank's shard and must not fail this one.
    path = _write(tmp_path / "r.jsonl", [_row(output=f"r{i}") for i in range(4)] + ["{bad"] + [_row()])
    sources = scan_sources([path])
    examples, drops, _ = read_examples(sources, [(1, 3)], renderer=RowRenderer(PromptFormat()), skip_bad_rows=False)
    assert sorted(examples) == [1, 2] and not drops
    assert examples[2].response == "r2"


def test_missing_data_file(tmp_path):
    with pytest.raises(PrealignInputError, match=r"nope\.jsonl: data file not found"):
        scan_sources([tmp_path / "nope.jsonl"])


def _run_tool(argv, capsys):
    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    try:
        import prealign as tool
    finally:
        sys.path.pop(0)
    code = tool.main(argv)
    return code, capsys.readouterr().err


def test_tool_reports_bad_row_and_unreadable_tokenizer(tmp_path, demo, capsys):
    data = _write(tmp_path / "d.jsonl", [_row(), '{"prompt": "x", "output": null}'])
    base = ["--teacher-tokenizer", str(demo["teacher_tokenizer"]), "--student-tokenizer",
            str(demo["student_tokenizer"]), "--data", str(data), "--out", str(tmp_path / "out"), "--workers", "1"]
    code, err = _run_tool(base, capsys)
    assert code == 2 and "d.jsonl:2: field 'output' must be a string" in err
    assert not (tmp_path / "out" / "manifest.json").exists()

    empty_dir = tmp_path / "not_a_tokenizer"
    empty_dir.mkdir()
    argv = base.copy()
    argv[1] = str(empty_dir)
    code, err = _run_tool(argv, capsys)
    assert code == 2 and f"--teacher-tokenizer {empty_dir}: cannot load a tokenizer" in err

    code, err = _run_tool(["--data", str(data)], capsys)
    assert code == 2 and "missing settings: --teacher-tokenizer, --student-tokenizer, --out" in err
