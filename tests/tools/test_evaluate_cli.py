"""tools/evaluate.py: --help shows the examples and the defaults; --tensorboard DIR --step N writes the scores."""

from __future__ import annotations

import json

import pytest
from tool_support import load_tool, run_tool


def test_help_shows_examples_and_defaults() -> None:
    from dskd_scale.eval.config import EvalConfig
    from dskd_scale.eval.runner import DEFAULT_NEW_TOKENS

    done = run_tool("evaluate.py", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps help lines
    assert "examples:" in text and "python tools/evaluate.py --model DIR --suite" in text
    assert "--tensorboard runs/x/tensorboard --step 3000" in text
    defaults = EvalConfig(model="m")
    assert f"(default: {','.join(map(str, defaults.seeds))};" in text
    assert f"(default: {','.join(defaults.suites)})" in text
    assert f"(default: {defaults.batch_size})" in text and f"(default: {defaults.out})" in text
    assert (f"instruction {DEFAULT_NEW_TOKENS['instruction']}, math {DEFAULT_NEW_TOKENS['math']}, "
            f"code {DEFAULT_NEW_TOKENS['code']}") in text
    assert f"temperature {defaults.sampling.temperature}, top_p {defaults.sampling.top_p}" in text
    assert "Exit status: 0 done, 2 bad input" in text


@pytest.mark.e2e
@pytest.mark.assets
def test_scores_reach_the_tensorboard_folder_at_the_given_step(asset, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = tmp_path / "run" / "tensorboard"
    out = tmp_path / "results.json"
    code = load_tool("evaluate").main([
        "--model", str(asset("models/tiny-gpt2")), "--suite", "dolly,gsm8k", "--data-dir", str(asset("data")),
        "--greedy", "--limit", "2", "--max-new-tokens", "4", "--out", str(out), "--tensorboard", str(tensorboard),
        "--step", "1200"])  # fmt: skip
    assert code == 0
    suites = json.loads(out.read_text())["suites"]
    events = EventAccumulator(str(tensorboard))
    events.Reload()
    expected = {f"eval_scores/{suite}/{metric}": value for suite, entry in suites.items()
                for metric, value in entry["metrics"].items()}
    assert {"eval_scores/dolly/rougeL", "eval_scores/gsm8k/accuracy"} <= set(expected)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 1200 and event.value == pytest.approx(value, rel=1e-6)
