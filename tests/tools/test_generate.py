"""tools/generate.py: sequence-level KD data that 2 processes write exactly as 1, that resumes, that refuses changed
settings and bad rows clearly, and that tools/prealign.py reads as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from tool_support import ROOT, run_tool

pytestmark = [pytest.mark.assets]


def _rows(asset, tmp_path, count: int):
    source = asset("data/dolly/valid.jsonl").read_text().splitlines()[:count]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(source) + "\n")
    return data


def _common(asset, data, *extra: str) -> list[str]:
    return ["--model", str(asset("models/tiny-gpt2")), "--data", str(data), "--max-new-tokens", "6",
            "--batch-size", "2", "--block-examples", "3", "--seed", "7", *extra]


def test_records_are_prealign_ready_and_complete(asset, tmp_path):
    data = _rows(asset, tmp_path, 5)
    out = tmp_path / "responses.jsonl"
    done = run_tool("generate.py", *_common(asset, data, "--samples-per-prompt", "2", "--out", str(out)))
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    sources = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["example_index"], r["generation"]["sample"]) for r in records] == [(i, s) for i in range(5)
                                                                                   for s in range(2)]
    for record in records:
        assert record["prompt"] == sources[record["example_index"]]["prompt"]
        assert record["generation"]["source"] == f"{data}:{record['example_index'] + 1}"
        assert 0 < record["generation"]["new_tokens"] <= 6 or record["generation"]["finish"] == "eos"
    # two samples of one prompt differ (keyed noise per sample), so sampling really happened
    assert any(records[2 * i]["output"] != records[2 * i + 1]["output"] for i in range(5))
    manifest = json.loads((tmp_path / "responses.jsonl.manifest.json").read_text())
    assert manifest["records"] == 10 and sum(manifest["finish"].values()) == 10

    aligned = tmp_path / "aligned"
    prealign = run_tool("prealign.py", "--teacher-tokenizer", str(asset("tokenizers/gpt2")),
                        "--student-tokenizer", str(asset("tokenizers/llama2")), "--data", str(out),
                        "--out", str(aligned), "--skip-bad-rows")
    assert prealign.returncode == 0, prealign.stderr[-2000:]
    stats = json.loads((aligned / "manifest.json").read_text())["stats"]
    non_empty = sum(bool(r["output"].strip()) for r in records)
    assert stats["examples"] == non_empty and stats["source_rows"] == len(records)  # each non-empty one is a row


@pytest.mark.dist
def test_two_processes_write_the_records_of_one(asset, tmp_path):
    data = _rows(asset, tmp_path, 7)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", "29733", str(ROOT / "tools" / "generate.py")]
    two = subprocess.run([*launch, *_common(asset, data, "--out", str(tmp_path / "two.jsonl"))], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_tool("generate.py", *_common(asset, data, "--out", str(tmp_path / "one.jsonl")))
    assert one.returncode == 0, one.stderr[-2000:]
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) == 7


def test_resume_keeps_finished_blocks_and_refuses_other_settings(asset, tmp_path):
    data = _rows(asset, tmp_path, 7)
    out = tmp_path / "responses.jsonl"
    assert run_tool("generate.py", *_common(asset, data, "--out", str(out))).returncode == 0
    complete = out.read_bytes()
    parts = tmp_path / "responses.jsonl.parts"
    assert sorted(p.name for p in parts.glob("block-*.jsonl")) == ["block-00000.jsonl", "block-00001.jsonl",
                                                                   "block-00002.jsonl"]
    # a run killed after two blocks: the last block, the joined file and the manifest are missing, and a writer
    # left a temporary file behind
    kept = (parts / "block-00000.jsonl").stat().st_mtime_ns
    for path in (parts / "block-00002.jsonl", out, tmp_path / "responses.jsonl.manifest.json"):
        path.unlink()
    (parts / ".block-00002.jsonl.tmp-12345").write_text("partial")
    resumed = run_tool("generate.py", *_common(asset, data, "--out", str(out)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert out.read_bytes() == complete
    assert (parts / "block-00000.jsonl").stat().st_mtime_ns == kept  # not generated again
    assert not list(parts.glob(".*tmp*"))

    refused = run_tool("generate.py", *_common(asset, data, "--temperature", "0.5", "--out", str(out)))
    assert refused.returncode == 2
    assert "temperature" in refused.stderr and "Traceback" not in refused.stderr


def test_bad_rows_are_named_or_counted(asset, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi."}) + "\n" + json.dumps({"question": "no prompt"}) + "\n"
                    + "{not json\n")
    out = tmp_path / "responses.jsonl"
    failed = run_tool("generate.py", *_common(asset, data, "--out", str(out)))
    assert failed.returncode == 2
    assert f"{data}:2" in failed.stderr and "prompt" in failed.stderr and "Traceback" not in failed.stderr
    skipped = run_tool("generate.py", *_common(asset, data, "--out", str(out), "--skip-bad-rows"))
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    manifest = json.loads((tmp_path / "responses.jsonl.manifest.json").read_text())
    assert manifest["records"] == 1
    assert manifest["dropped_rows"] == {"malformed_json": 1, "missing_field": 1}


def test_alpaca_template_renders_the_prompts_prealign_renders(asset, tmp_path):
    data = _rows(asset, tmp_path, 3)
    out = tmp_path / "responses.jsonl"
    done = run_tool("generate.py", *_common(asset, data, "--template", "alpaca", "--greedy", "--out",
                                            str(out)))
    assert done.returncode == 0, done.stderr[-2000:]
    sources = [json.loads(line) for line in data.read_text().splitlines()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # the shared Dolly file's `prompt` field is the Alpaca rendering of instruction + input
    assert [r["prompt"] for r in records] == [s["prompt"] for s in sources]
