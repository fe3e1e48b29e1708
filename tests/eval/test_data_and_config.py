"""Bad input gets a clear error naming file:line or the config key, or a counted skip when asked for."""

from __future__ import annotations

import json

import pytest

from dskd_scale.config.loader import ConfigError, build_config, load_config
from dskd_scale.eval.config import EvalConfig
from dskd_scale.eval.data import DataError, load_gsm8k, load_humaneval, load_instruction_suite, load_mbpp


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_raise_with_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "output": "o"})
    path = _write(tmp_path / "x.jsonl", [good, "", "{not json", good])
    with pytest.raises(DataError, match=r"x\.jsonl:3: not valid JSON"):
        load_instruction_suite(path)
    path = _write(tmp_path / "y.jsonl", [good, json.dumps({"prompt": "p"})])
    with pytest.raises(DataError, match=r"y\.jsonl:2: missing field 'output'"):
        load_instruction_suite(path)
    path = _write(tmp_path / "e.jsonl", [json.dumps({"prompt": "  ", "output": "o"})])
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'prompt' is empty"):
        load_instruction_suite(path)
    path = _write(tmp_path / "z.jsonl", [json.dumps({"prompt": "p", "output": []})])
    with pytest.raises(DataError, match=r"z\.jsonl:1: field 'output' must be"):
        load_instruction_suite(path)


def test_skip_mode_counts_every_skipped_row(tmp_path):
    good = json.dumps({"prompt": "p", "output": ["a", "b"]})
    path = _write(tmp_path / "x.jsonl", [good, "{oops", json.dumps([1, 2]), good])
    loaded = load_instruction_suite(path, on_bad_row="skip")
    assert [e.index for e in loaded.examples] == [0, 3] and loaded.examples[1].source.endswith("x.jsonl:4")
    assert len(loaded.skipped) == 2 and "x.jsonl:2" in loaded.skipped[0] and "x.jsonl:3" in loaded.skipped[1]
    with pytest.raises(DataError, match="no usable rows"):
        load_instruction_suite(_write(tmp_path / "bad.jsonl", ["{oops"]), on_bad_row="skip")


def test_missing_files_and_gsm8k_without_marker(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_humaneval(tmp_path / "nope.jsonl.gz")
    path = _write(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "it is 5"})])
    with pytest.raises(DataError, match=r"g\.jsonl:1: GSM8K answer has no"):
        load_gsm8k(path)


def test_real_files_load(asset):
    assert len(load_instruction_suite(asset("data/vicuna/valid.jsonl")).examples) == 80
    assert len(load_humaneval(asset("data/humaneval/HumanEval.jsonl.gz")).examples) == 164
    suite, shots = load_mbpp(asset("data/mbpp/sanitized-mbpp.json"))
    assert len(suite.examples) == 257 and all(11 <= e.extra["task_id"] <= 510 for e in suite.examples)
    assert load_gsm8k(asset("data/gsm8k/test.jsonl"), limit=3).examples[0].reference == "18"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        build_config(EvalConfig, {"model": "m", "suites": ["dolly", "squad"], "seeds": [1, 1], "batch_size": 0,
                                  "sampling": {"temperature": 0}})  # fmt: skip
    message = str(err.value)
    for expected in ("unknown suite 'squad'", "data_dir is required", "seeds must be distinct", "batch_size",
                     "sampling.temperature must be > 0"):  # fmt: skip
        assert expected in message
    config = build_config(EvalConfig, {"model": "m", "suites": ["mine"], "data_paths": {"mine": "/d/mine.jsonl"}})
    assert config.suite_kind("mine") == "instruction" and config.data_path("mine") == "/d/mine.jsonl"
    config = build_config(EvalConfig, {"model": "m", "data_dir": "/d", "limit": 5, "suite_limits": {"vicuna": 2}})
    assert config.data_path("dolly") == "/d/dolly/valid.jsonl"
    assert (config.limit_for("dolly"), config.limit_for("vicuna")) == (5, 2)
    with pytest.raises(ConfigError, match="suite_limits.gsm8k names a suite that is not in suites"):
        build_config(EvalConfig, {"model": "m", "data_dir": "/d", "suite_limits": {"gsm8k": 2}})


def test_every_eval_yaml_loads_and_validates(project_root, tmp_path):
    files = sorted((project_root / "configs" / "eval").glob("**/*.yaml"))
    assert files
    for path in files:
        config = load_config(EvalConfig, path, ["model=some/model"])
        assert config.suites and config.seeds
    with pytest.raises(ConfigError, match=r"model .*paper_instruction\.yaml:\d+"):  # model: null must be set
        load_config(EvalConfig, project_root / "configs/eval/paper_instruction.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata_dir: d\nsampling:\n  top_q: 0.9\n")
    with pytest.raises(ConfigError, match=r"sampling\.top_q \(.*bad\.yaml:4\): unknown key; did you mean 'top_p'"):
        load_config(EvalConfig, bad)
