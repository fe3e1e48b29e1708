"""Fixtures of the on-policy tests: the engine tests' demo assets (tokenizers, prealigned shards, saved tiny models)
and their launch helpers, shared rather than rebuilt differently."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for folder in ("engine", "losses"):  # engine_helpers, run_worker; test_criteria's World, tolerance
    if str(TESTS / folder) not in sys.path:
        sys.path.insert(0, str(TESTS / folder))

_spec = importlib.util.spec_from_file_location("engine_conftest", TESTS / "engine" / "conftest.py")
_engine_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_engine_conftest)
demo = _engine_conftest.demo  # session fixture: demo tokenizers, shards ("eta", "same") and tiny models
