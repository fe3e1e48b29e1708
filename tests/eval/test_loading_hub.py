"""Evaluation (and tools/generate.py) take a model as a folder or a Hub id; an unreachable Hub gives one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dskd_scale.utils.hub import is_hub_id

ROOT = Path(__file__).resolve().parents[2]


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("gpt2") and is_hub_id("Qwen/Qwen2.5-1.5B")
    assert not is_hub_id(str(tmp_path / "missing"))  # an absolute path that does not exist is a missing folder
    assert not is_hub_id("runs/x/export/extra")  # three parts: a relative path, never a Hub id


@pytest.mark.timeout(120)
def test_a_hub_model_that_cannot_be_had_offline_is_one_clear_error(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "generate.py"), "--model", "no-such-owner/no-model",
                           "--data", str(rows), "--out", str(tmp_path / "out.jsonl")],
                          env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "no-such-owner/no-model" in done.stderr and "Hub" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
