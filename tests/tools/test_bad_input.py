"""Every tool answers bad input the same way: exit status 2, one clear line on stderr, no traceback.

Each case is what a user gets wrong (a missing or wrong folder, an unwritable output, a malformed flag), run as a
separate process exactly as typed on a command line. A new tool must add its cases here (the last test checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tool_support import TOOLS, run_tool


def cases(tmp: Path) -> dict[str, list[tuple[str, list[str], str]]]:
    """tool -> [(case id, argv, text the error line must contain)]."""
    blocked = tmp / "a_file"  # a path under a regular file can never be created, not even by root
    blocked.write_text("x")
    not_a_tokenizer = tmp / "empty_folder"
    not_a_tokenizer.mkdir()
    damaged = tmp / "step_00000004"  # COMPLETE lists a file that a kill during pruning took away
    damaged.mkdir()
    (damaged / "COMPLETE").write_text('{"files": {"mp_rank_00_model_states.pt": 10}}')
    rows = tmp / "rows.jsonl"
    rows.write_text('{"prompt": "p", "output": "o"}\n')
    run_yaml = tmp / "run.yaml"  # a misspelt config key
    run_yaml.write_text("teacher:\n  pathh: models/teacher\n")
    plan_flags = ["--world-size", "16", "--nodes", "2", "--micro-batch-size", "4", "--seq-tokens", "256",
                  "--rows-per-example", "150", "--train-examples", "1000", "--gpu-tflops", "989", "--mfu", "0.4",
                  "--inter-node-gbit-per-s", "400", "--intra-node-gb-per-s", "450"]
    return {
        "alignment_report.py": [("not_prealigned", [str(tmp / "missing")], "no manifest")],
        "build_mined_map.py": [
            ("missing_folder", ["--teacher-tokenizer", str(tmp / "missing"), "--student-tokenizer", str(tmp),
                                "--out", str(tmp / "m.safetensors")], "is not a folder"),
            ("not_a_tokenizer", ["--teacher-tokenizer", str(not_a_tokenizer), "--student-tokenizer",
                                 str(not_a_tokenizer), "--out", str(tmp / "m.safetensors")], "not a Hugging Face"),
        ],
        "cache_teacher.py": [
            ("missing_teacher", ["--teacher", str(tmp / "missing"), "--data", str(tmp), "--out", str(tmp / "c")],
             "model folder not found"),
            ("missing_data", ["--teacher", str(not_a_tokenizer), "--data", str(tmp / "missing"), "--out",
                              str(tmp / "c")], "no manifest.json"),
            ("wrong_dtype", ["--teacher", str(not_a_tokenizer), "--data", str(tmp), "--out", str(tmp / "c"),
                             "--dtype", "fp16"], "--dtype must be one of bf16, fp8_e4m3"),
            ("config_key", ["--config", str(run_yaml), "--out", str(tmp / "c")], "teacher.pathh"),
        ],
        "compare_results.py": [
            ("missing_file", [str(tmp / "missing.json")], "results file not found"),
            ("labels", [str(tmp / "a.json"), "--labels", "A,B"], "2 labels for 1 files"),
        ],
        "demo.py": [
            ("bad_seeds", ["--out", str(tmp / "demo"), "--seeds", "ten"], "--seeds"),
            ("unwritable_out", ["--out", str(blocked / "demo")], str(blocked)),
        ],
        "evaluate.py": [
            ("missing_data", ["--model", str(tmp / "m"), "--suite", "dolly", "--data-dir", str(tmp / "d")],
             "data file not found"),
            ("data_path_syntax", ["--model", str(tmp / "m"), "--data-path", "dolly"], "SUITE=FILE"),
            ("tensorboard_without_step", ["--model", str(tmp / "m"), "--tensorboard", str(tmp / "tb")], "--step"),
        ],
        "export.py": [
            ("missing_checkpoint", [str(tmp / "missing"), str(tmp / "out")], "does not exist"),
            ("no_complete_checkpoint", [str(not_a_tokenizer), str(tmp / "out")], "neither a complete checkpoint"),
            ("damaged_checkpoint", [str(damaged), str(tmp / "out")], "mp_rank_00_model_states.pt is missing"),
        ],
        "generate.py": [
            ("missing_model", ["--model", str(tmp / "missing"), "--data", str(rows), "--out", str(tmp / "g.jsonl")],
             "model folder not found"),
            ("missing_data", ["--model", str(tmp / "missing"), "--data", str(tmp / "missing.jsonl"), "--out",
                              str(tmp / "g.jsonl")], "missing.jsonl"),
        ],
        "import_gguf.py": [("missing_gguf", ["--gguf", str(tmp / "missing.gguf"), "--out", str(tmp / "o")],
                            "missing.gguf")],
        "make_demo_assets.py": [
            ("unwritable_out", ["--out", str(blocked / "assets"), "--train", "2", "--valid", "1", "--test", "1"],
             str(blocked)),
            ("bad_count", ["--out", str(tmp / "assets"), "--train", "0"], "--train"),
        ],
        "plan_scale.py": [
            ("missing_config", ["--teacher", str(tmp / "missing"), "--student", str(not_a_tokenizer), *plan_flags],
             f"--teacher {tmp / 'missing'}: no such config.json"),
            ("not_a_config", ["--teacher", str(blocked), "--student", str(blocked), *plan_flags],
             "not a causal-LM config.json"),
            ("bad_mfu", ["--teacher", str(tmp), "--student", str(tmp), *plan_flags, "--mfu", "1.5"], "--mfu"),
        ],
        "prealign.py": [
            ("missing_tokenizer", ["--teacher-tokenizer", str(tmp / "missing"), "--student-tokenizer",
                                   str(tmp / "missing"), "--data", str(tmp / "x.jsonl"), "--out", str(tmp / "p")],
             "missing"),
            ("missing_settings", ["--out", str(tmp / "p")], "missing settings"),
        ],
    }


def _all_cases() -> list[tuple[str, str]]:
    """(tool, case id) pairs, computed without touching the disk."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return [(tool, case) for tool, tool_cases in cases(Path(tmp)).items() for case, _, _ in tool_cases]


@pytest.mark.parametrize(("tool", "case"), _all_cases())
def test_bad_input_exits_2_with_one_error_line(tool: str, case: str, tmp_path: Path) -> None:
    (_, argv, expected), = [entry for entry in cases(tmp_path)[tool] if entry[0] == case]
    result = run_tool(tool, *argv)
    assert result.returncode == 2, f"{tool} {case}: exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr[-3000:]
    assert expected in error_lines[0], (expected, error_lines[0])


def test_every_tool_has_bad_input_cases(tmp_path: Path) -> None:
    assert sorted(cases(tmp_path)) == sorted(path.name for path in TOOLS.glob("*.py"))
