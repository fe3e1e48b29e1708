"""Shared by the tools tests: run a tool as a user would (its own process), or import it as a module."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"


def run_tool(name: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(TOOLS / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dskd_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
