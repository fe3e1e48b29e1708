"""Two torchrun processes (gloo) produce exactly the records of one process: greedy and keyed sampling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.dist, pytest.mark.assets]
PROJECT = Path(__file__).resolve().parents[2]


def test_two_processes_equal_one_process(asset, tmp_path, load_tool):
    common = [
        "--model", str(asset("models/tiny-gpt2")), "--suite", "dolly,humaneval",
        "--data-dir", str(asset("data")), "--seeds", "10", "--limit", "5", "--batch-size", "2",
        "--max-new-tokens", "8",
    ]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", "29711", str(PROJECT / "tools" / "evaluate.py")]  # fmt: skip
    done = subprocess.run([*launch, *common, "--out", str(tmp_path / "two" / "results.json")], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_tool("evaluate").main([*common, "--out", str(tmp_path / "one" / "results.json")]) == 0

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["protocol_sha256"] == two["protocol_sha256"] and one["config_sha256"] != two["config_sha256"]
    for suite in ("dolly", "humaneval"):
        assert one["suites"][suite]["metrics"] == two["suites"][suite]["metrics"]
        per_rank = two["suites"][suite]["generation"]["examples_per_rank"]
        assert len(per_rank) == 2 and min(per_rank) > 0  # both ranks really generated a share
    files = sorted(p.name for p in (tmp_path / "one" / "results_records").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two" / "results_records").iterdir())
    assert files == ["dolly.10.jsonl", "humaneval.greedy.jsonl"]  # keyed sampling, then greedy decoding
    for name in files:
        assert (tmp_path / "one" / "results_records" / name).read_text() == \
            (tmp_path / "two" / "results_records" / name).read_text(), name
