"""results.json tables and the side-by-side comparison."""

from __future__ import annotations

import json

import pytest

from dskd_scale.eval.results import (
    RESULTS_FORMAT,
    comparability_notes,
    compare_table,
    format_table,
    read_results,
    write_results,
)


def _results(dolly, vicuna, gsm8k, seeds=(10, 20)):
    def suite(kind, metric, value, std):
        return {"kind": kind, "metrics": {metric: value, f"{metric}_std": std}, "runs": {str(s): {} for s in seeds},
                "num_examples": 4, "decoding": {"seeds": list(seeds)}}  # fmt: skip

    return {"format": RESULTS_FORMAT, "format_version": 1, "suites": {
        "dolly": suite("instruction", "rougeL", dolly, 1.5), "vicuna": suite("instruction", "rougeL", vicuna, 0.0),
        "gsm8k": suite("math", "accuracy", gsm8k, 0.0)}}  # fmt: skip


def test_format_table_has_every_suite_metric_and_the_average():
    table = format_table(_results(20.0, 10.0, 50.0))
    assert "20.00 ± 1.50" in table and "50.00" in table
    assert "avg(instruction)" in table and "15.00" in table


def test_compare_table_shows_deltas_against_the_first(tmp_path, capsys, load_tool):
    compare_main = load_tool("compare_results").main
    sft, dskd = _results(20.0, 10.0, 50.0), _results(23.5, 11.0, 40.0, seeds=(10,))
    table = compare_table([sft, dskd], ["SFT", "DSKD"])
    assert "+3.50" in table and "-10.00" in table and "avg(dolly,vicuna)" in table and "+2.25" in table
    notes = comparability_notes([sft, dskd], ["SFT", "DSKD"])
    assert any("different decoding" in n for n in notes) and not any("protocol" in n for n in notes)
    dskd["protocol_sha256"] = "other"
    assert any("different protocol" in n for n in comparability_notes([sft, dskd], ["SFT", "DSKD"]))
    write_results(sft, tmp_path / "sft" / "results.json")
    write_results(dskd, tmp_path / "dskd" / "results.json")
    assert compare_main([str(tmp_path / "sft" / "results.json"), str(tmp_path / "dskd" / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "sft" in out.splitlines()[0] and "Δ dskd" in out.splitlines()[0]


def test_read_results_rejects_other_files(tmp_path, load_tool):
    compare_main = load_tool("compare_results").main
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a dskd_scale results file"):
        read_results(tmp_path / "other.json")
    with pytest.raises(ValueError, match="results file not found"):
        read_results(tmp_path / "missing.json")
    assert compare_main([str(tmp_path / "other.json")]) == 2
