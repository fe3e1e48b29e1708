"""Shared fixtures of the prealignment tests: cached tokenizers, a small generated demo, Dolly slices."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from dskd_scale.utils.assets import asset_path, missing_asset_reason

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def real_asset(relative: str) -> Path:
    """Path of a shared asset, or skip (with the reason) when it is absent."""
    path = asset_path(relative)
    if path is None:
        pytest.skip(missing_asset_reason(relative))
    return path


@functools.cache
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="session")
def tokenizer():
    """``tokenizer("tokenizers/gpt2")`` -> a cached fast tokenizer from the shared assets (skips if absent)."""
    return lambda relative: _load_tokenizer(str(real_asset(relative)))


@pytest.fixture(scope="session")
def load_tokenizer():
    """Cached AutoTokenizer for any folder."""
    return lambda path: _load_tokenizer(str(path))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict[str, Path]:
    """A small generated demo (data + both tokenizers), built once per session."""
    from dskd_scale.demo import build_demo_assets

    return build_demo_assets(tmp_path_factory.mktemp("demo"), seed=7, train=400, valid=40, test=40)


@pytest.fixture(scope="session")
def dolly_slice(tmp_path_factory):
    """``dolly_slice(n)`` -> path of a JSON-lines file with the first n Dolly dev rows (skips if absent)."""
    folder = tmp_path_factory.mktemp("dolly")

    def make(rows: int) -> Path:
        source = real_asset("data/dolly/dev.jsonl")
        target = folder / f"dolly-{rows}.jsonl"
        if not target.exists():
            with open(source, encoding="utf-8") as handle:
                lines = [next(handle) for _ in range(rows)]
            target.write_text("".join(lines), encoding="utf-8")
        return target

    return make
