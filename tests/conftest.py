"""Shared test plumbing: asset lookup that skips with a reason, and a CPU-only environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dskd_scale.utils.assets import asset_path, missing_asset_reason

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def require_asset(relative: str) -> Path:
    """Return the asset's path, or skip the calling test with a reason naming what is missing."""
    path = asset_path(relative)
    if path is None:
        pytest.skip(missing_asset_reason(relative))
    return path


@pytest.fixture
def asset():
    """``asset("tokenizers/gpt2")`` -> Path, skipping the test when the asset is absent."""
    return require_asset


@pytest.fixture
def project_root() -> Path:
    return PROJECT_ROOT
