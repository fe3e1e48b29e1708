"""Evaluation data through ``datasets``: Parquet, CSV and save_to_disk give the same examples as JSON lines, and
bad rows name ``file row N``."""

from __future__ import annotations

import json

import pytest

from dskd_scale.eval.data import DataError, load_gsm8k, load_instruction_suite


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


def test_instruction_suite_from_every_format(tmp_path, datasets_cache):
    import datasets

    rows = [{"prompt": f"Say {i}.", "output": f"{i}"} for i in range(7)]
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "valid.parquet"))
    table.to_csv(str(tmp_path / "valid.csv"), index=False)
    table.save_to_disk(str(tmp_path / "saved"))
    reference = [(e.index, e.prompt, e.reference) for e in load_instruction_suite(jsonl).examples]
    for source in (tmp_path / "valid.parquet", tmp_path / "valid.csv", tmp_path / "saved"):
        suite = load_instruction_suite(source)
        assert [(e.index, e.prompt, e.reference) for e in suite.examples] == reference
        assert suite.examples[3].source == f"{source} row 3"


def test_bad_row_of_a_parquet_file_names_the_row(tmp_path, datasets_cache):
    import datasets

    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "no number"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "test.parquet"))
    with pytest.raises(DataError, match=r"test\.parquet row 1: "):
        load_gsm8k(tmp_path / "test.parquet")
    assert len(load_gsm8k(tmp_path / "test.parquet", on_bad_row="skip").skipped) == 1
    with pytest.raises(DataError, match=r"valid\.txt: unknown data file type"):
        (tmp_path / "valid.txt").write_text("{}\n", encoding="utf-8")
        load_instruction_suite(tmp_path / "valid.txt")
