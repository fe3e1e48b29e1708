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


_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_launcher_variables_leak(request):
    """Fail the test that leaves torch.distributed launcher variables behind.

    Later tests start real launchers (mpiexec, srun) that do not overwrite RANK/WORLD_SIZE; a stale value
    inherited from the test process would silently turn a 2-rank run into two single-process runs.
    """
    before = {name: os.environ.get(name) for name in _LAUNCHER_VARIABLES}
    yield
    leaked = {name: os.environ[name] for name in _LAUNCHER_VARIABLES
              if os.environ.get(name) != before[name] and name in os.environ}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    assert not leaked, f"{request.node.nodeid} left launcher variables in os.environ: {leaked}"
