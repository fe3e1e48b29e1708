"""The chunked drivers under DeepSpeed ZeRO-3 with the student head called as a partitioned module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PORT = 29821


@pytest.mark.dist
def test_zero3_module_head_gradients_match_plain_torch():
    script = Path(__file__).with_name("zero3_head_check.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, str(script), str(PORT)], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("MAXDIFF")][-1]
    _, max_diff, _, loss_diff = line.split()
    assert float(max_diff) < 1e-5 and float(loss_diff) < 1e-4, line
