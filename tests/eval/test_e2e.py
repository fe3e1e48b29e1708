"""tools/evaluate.py end to end on the tiny real model, every suite, and its errors on bad input."""

from __future__ import annotations

import json

import pytest

from dskd_scale.eval.answers import extract_final_number
from dskd_scale.eval.metrics import rouge_l

pytestmark = [pytest.mark.e2e, pytest.mark.assets]
SUITES = ["dolly", "self-inst", "vicuna", "gsm8k", "humaneval", "mbpp"]


def test_every_suite_on_tiny_gpt2(asset, tmp_path, load_tool, capsys):
    evaluate = load_tool("evaluate")
    out = tmp_path / "run" / "results.json"
    code = evaluate.main([
        "--model", str(asset("models/tiny-gpt2")), "--suite", ",".join(SUITES), "--data-dir", str(asset("data")),
        "--seeds", "10", "--limit", "4", "--max-new-tokens", "8", "--batch-size", "4", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())
    assert results["format"] == "dskd_scale.eval_results" and len(results["config_sha256"]) == 64
    assert len(results["protocol_sha256"]) == 64 and results["model"]["weights"] == {"model.safetensors": (
        asset("models/tiny-gpt2") / "model.safetensors").stat().st_size}
    assert results["model"]["path"].endswith("tiny-gpt2") and results["model"]["pad_token"].startswith("set to eos")
    assert list(results["suites"]) == SUITES
    headline = {"dolly": "rougeL", "self-inst": "rougeL", "vicuna": "rougeL", "gsm8k": "accuracy",
                "humaneval": "pass@1", "mbpp": "pass@1"}  # fmt: skip
    records_dir = tmp_path / "run" / "results_records"
    for suite, metric in headline.items():
        entry = results["suites"][suite]
        assert entry["num_examples"] == 4 and metric in entry["metrics"] and entry["data"]["sha256"]
        runs = ["10"] if metric == "rougeL" else ["greedy"]
        assert list(entry["runs"]) == runs
        for run in runs:
            records = [json.loads(line) for line in (records_dir / f"{suite}.{run}.jsonl").read_text().splitlines()]
            assert len(records) == 4 and all(r["new_tokens"] <= 8 for r in records)
            mean = sum(r[metric] for r in records) / 4
            assert entry["runs"][run][metric] == pytest.approx(mean)
            for r in records:  # every number traces back to its example
                if metric == "rougeL":
                    assert r[metric] == pytest.approx(rouge_l(r["generation"], r["reference"]))
                if metric == "accuracy":
                    assert r["predicted"] == extract_final_number(r["generation"])
    assert "dolly" in capsys.readouterr().out  # the printed table


def test_bad_input_gives_clear_errors(asset, tmp_path, load_tool, capsys):
    evaluate = load_tool("evaluate")
    data = ["--suite", "dolly", "--data-dir", str(asset("data")), "--limit", "1", "--out", str(tmp_path / "x.json")]
    assert evaluate.main(["--model", str(tmp_path / "missing"), *data]) == 2
    assert "model folder not found" in capsys.readouterr().err
    # data problems surface before any model is loaded (the missing model is never reached)
    assert evaluate.main(["--model", str(tmp_path / "missing"), "--suite", "dolly", "--data-dir", "/x"]) == 2
    assert "data file not found: /x/dolly/valid.jsonl" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((asset("models/tiny-gpt2") / "config.json").read_text())
    assert evaluate.main(["--model", str(no_tokenizer), *data]) == 2
    assert "no tokenizer files" in capsys.readouterr().err
    assert evaluate.main(["--model", str(no_tokenizer), "--tokenizer", str(asset("tokenizers/gpt2")), *data]) == 2
    assert "cannot load model weights" in capsys.readouterr().err
    assert evaluate.main(["--model", "m", "--suite", "dolly,squad", "--data-dir", "/x"]) == 2
    assert "unknown suite 'squad'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "output": "o"}\n{"prompt": 3, "output": "o"}\n')
    args = ["--model", str(asset("models/tiny-gpt2")), "--suite", "mine", "--data-path", f"mine={bad}",
            "--greedy", "--max-new-tokens", "4", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert evaluate.main(args) == 2
    assert "bad.jsonl:2: field 'prompt' has type int" in capsys.readouterr().err
    assert evaluate.main([*args, "--skip-bad-rows"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["suites"]["mine"]["num_examples"] == 1 and len(results["skipped_rows"]["mine"]) == 1
