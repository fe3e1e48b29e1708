"""Locate the optional third-party test assets (real tokenizers, tiny models, datasets).

The assets never ship with the project. Tests and benchmarks find them through ``DSKD_ASSETS``
(default: ``<project root>/../shared/assets``) and skip with a reason when they are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ASSETS_ENV = "DSKD_ASSETS"


def assets_dir() -> Path:
    """The configured assets folder (it may not exist)."""
    configured = os.environ.get(ASSETS_ENV)
    return Path(configured) if configured else PROJECT_ROOT.parent / "shared" / "assets"


def asset_path(relative: str) -> Path | None:
    """Path of ``relative`` under the assets folder, or None when it is not there."""
    path = assets_dir() / relative
    return path if path.exists() else None


def missing_asset_reason(relative: str) -> str:
    return f"asset '{relative}' not found under {assets_dir()} (set {ASSETS_ENV} to the shared assets folder)"
