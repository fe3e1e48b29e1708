"""Input data through ``datasets``: the same rows as JSON lines, a JSON list, Parquet, CSV or a save_to_disk
folder give byte-identical shards; bad rows name ``file row N``; a Hub dataset or tokenizer that cannot be reached
is one clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd_scale.prealign.pipeline import PrealignConfig, run_prealign
from dskd_scale.prealign.sources import PrealignInputError, scan_sources
from dskd_scale.utils.data_sources import DataSourceError, parse_spec

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files ``datasets`` prepares for local files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def _rows(demo, count=60):
    lines = Path(demo["train"]).read_text(encoding="utf-8").splitlines()[:count]
    return [{"prompt": row["prompt"], "output": row["output"], "instruction": row["instruction"]}
            for row in map(json.loads, lines)]


def _config(demo, data, out):
    return PrealignConfig(teacher_tokenizer=str(demo["teacher_tokenizer"]),
                          student_tokenizer=str(demo["student_tokenizer"]), data=(str(data),), out=str(out),
                          max_length=96, num_shards=2, workers=1)


def _shards(out: Path, manifest) -> list[bytes]:
    return [(out / shard["file"]).read_bytes() for shard in manifest["shards"]]


def test_every_format_gives_the_same_shards_as_json_lines(demo, tmp_path, datasets_cache):
    import datasets

    rows = _rows(demo)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    reference = run_prealign(_config(demo, jsonl, tmp_path / "ref"))
    expected = _shards(tmp_path / "ref", reference)

    table = datasets.Dataset.from_list(rows)
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")  # a JSON list (Alpaca's layout)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": table.select(range(5)), "test": table}).save_to_disk(str(tmp_path / "dict"))
    for given, kind in [(tmp_path / "rows.json", "datasets_file"), (tmp_path / "rows.parquet", "datasets_file"),
                        (tmp_path / "rows.csv", "datasets_file"), (tmp_path / "saved", "save_to_disk"),
                        (f"{tmp_path / 'dict'}?split=test", "save_to_disk")]:
        out = tmp_path / f"out_{Path(str(given)).name}"
        manifest = run_prealign(_config(demo, given, out))
        assert _shards(out, manifest) == expected, given
        assert manifest["sources"][0]["format"] == kind and manifest["sources"][0]["rows"] == len(rows)
        assert manifest["stats"] == reference["stats"]
    # the default split of a DatasetDict folder is train
    assert scan_sources([tmp_path / "dict"])[0].rows == 5


def test_bad_rows_in_a_format_without_lines_name_the_row(demo, tmp_path, datasets_cache):
    import datasets

    rows = _rows(demo, 8)
    rows[5]["output"] = None
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(PrealignInputError, match=r"bad\.parquet row 5: field 'output' must be a string .*got no "
                                                 r"value \(null\).*--skip-bad-rows"):
        run_prealign(_config(demo, tmp_path / "bad.parquet", tmp_path / "out"))
    skipping = dataclasses.replace(_config(demo, tmp_path / "bad.parquet", tmp_path / "skip"), skip_bad_rows=True)
    manifest = run_prealign(skipping)
    assert manifest["stats"]["examples"] == 7 and manifest["stats"]["dropped_examples"]["non_string_field"] == 1


@pytest.mark.parametrize(("given", "message"), [
    ("nope.jsonl", r"nope\.jsonl: data file not found \(a Hub dataset is written hf:NAME\)"),
    ("hf:", "write a Hub dataset as hf:NAME"),
    ("hf:org/name?spilt=train", r"unknown option\(s\) \['spilt'\]"),
])
def test_source_spec_errors(tmp_path, given, message):
    with pytest.raises(DataSourceError, match=message):
        parse_spec(given)


def test_unknown_file_type_and_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "rows.txt").write_text("x\n", encoding="utf-8")
    with pytest.raises(PrealignInputError, match=r"rows\.txt: unknown data file type '\.txt'"):
        scan_sources([tmp_path / "rows.txt"])
    with pytest.raises(DataSourceError, match="not written by datasets' save_to_disk"):
        parse_spec(tmp_path)
    spec = parse_spec("hf:tatsu-lab/alpaca?split=train&revision=abc")
    assert (spec.kind, spec.target, spec.split, spec.revision, spec.config) == ("hub", "tatsu-lab/alpaca", "train",
                                                                               "abc", None)


def _tool(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home-for-tests"}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "tools" / "prealign.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)


def test_hub_dataset_and_tokenizer_out_of_reach_are_one_clear_error(demo, tmp_path):
    tokenizers = ["--teacher-tokenizer", str(demo["teacher_tokenizer"]), "--student-tokenizer",
                  str(demo["student_tokenizer"])]
    result = _tool(*tokenizers, "--data", "hf:nobody-here/no-such-dataset", "--out", str(tmp_path / "a"))
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("prealign: error:")]
    assert "hf:nobody-here/no-such-dataset: cannot load the Hub dataset 'nobody-here/no-such-dataset'" in line
    assert "save_to_disk" in line and "Traceback" not in result.stderr

    result = _tool("--teacher-tokenizer", "nobody-here/no-such-tokenizer", "--student-tokenizer",
                   str(demo["student_tokenizer"]), "--data", str(demo["train"]), "--out", str(tmp_path / "b"))
    assert result.returncode == 2, result.stderr
    assert ("--teacher-tokenizer: tokenizer 'nobody-here/no-such-tokenizer' is not a local folder and could not be "
            "loaded from the Hugging Face Hub") in result.stderr
