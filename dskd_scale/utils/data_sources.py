"""Rows from the data sources people have: JSON-lines files (read here, so every row has a ``file:line``), and,
through ``datasets``, ``.json``/``.parquet``/``.csv``/``.tsv`` files, ``save_to_disk`` folders and Hub datasets.

A source is named by one string (``parse_spec``):
- ``PATH.jsonl`` / ``.jsonl.gz`` / ``.ndjson``: JSON lines; rows are reported as ``file:line``;
- ``PATH.json`` (a list of rows, or JSON lines), ``.parquet``, ``.csv``, ``.tsv``: rows are ``file row N`` (0-based);
- ``DIR`` written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with ``DIR?split=NAME``, default train);
- ``hf:NAME`` with optional ``?split=`` (default train), ``&config=`` and ``&revision=``: a Hub dataset, loaded
  through ``datasets`` and its cache (offline: a cached copy with ``HF_HUB_OFFLINE=1``, or a save_to_disk folder).
Used by prealignment (``dskd_scale.prealign.sources``) and evaluation (``dskd_scale.eval.data``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

HUB_PREFIX = "hf:"
_LINE_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_DATASETS_BUILDERS = {".json": "json", ".json.gz": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}
_SPEC_OPTIONS = {"split", "config", "revision"}


class DataSourceError(ValueError):
    """A source that cannot be read; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class MalformedRow:
    """A JSON line that does not parse (``message`` names ``file:line``)."""

    message: str


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed ``--data`` value. ``kind``: ``jsonl`` (our JSON-lines reader), ``datasets_file`` (a file read by
    ``datasets``), ``save_to_disk`` (a folder) or ``hub``."""

    given: str
    kind: str
    target: str
    split: str | None = None
    config: str | None = None
    revision: str | None = None


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def parse_spec(given: str | os.PathLike) -> SourceSpec:
    """Classify a source string (see the module docstring).

    Raises:
        DataSourceError: a local path that does not exist, an unknown file type or option.
    """
    text = str(given)
    if Path(text).exists():  # a local name wins, even if it contains "?"
        target, options = text, {}
    else:
        target, _, query = text.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
        unknown = sorted(set(options) - _SPEC_OPTIONS)
        if unknown:
            raise DataSourceError(f"{text}: unknown option(s) {unknown} (known: {sorted(_SPEC_OPTIONS)})")
    if target.startswith(HUB_PREFIX):
        name = target.removeprefix(HUB_PREFIX)
        if not name:
            raise DataSourceError(f"{text}: write a Hub dataset as hf:NAME, e.g. hf:tatsu-lab/alpaca")
        return SourceSpec(text, "hub", name, options.get("split", "train"), options.get("config"),
                          options.get("revision"))
    path = Path(target)
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            raise DataSourceError(f"{text}: a folder that was not written by datasets' save_to_disk "
                                     "(no dataset_info.json or dataset_dict.json)")
        return SourceSpec(text, "save_to_disk", target, options.get("split"))
    if not path.is_file():
        raise DataSourceError(f"{text}: data file not found (a Hub dataset is written hf:NAME)")
    if options:
        raise DataSourceError(f"{text}: options {sorted(options)} apply to Hub datasets and folders only")
    suffix = _suffix(path)
    if suffix in _LINE_SUFFIXES:
        return SourceSpec(text, "jsonl", target)
    if suffix in _DATASETS_BUILDERS:
        return SourceSpec(text, "datasets_file", target)
    known = sorted(_LINE_SUFFIXES + tuple(_DATASETS_BUILDERS))
    raise DataSourceError(f"{text}: unknown data file type {suffix!r} (known: {', '.join(known)}, a "
                             "save_to_disk folder, or hf:NAME)")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _data_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line."""
    with _open_binary(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_number, raw


@functools.cache
def open_dataset(spec: SourceSpec) -> Any:
    """The ``datasets.Dataset`` of a ``datasets_file``, ``save_to_disk`` or ``hub`` source (loaded once per process).

    Raises:
        DataSourceError: unreadable file, a ``DatasetDict`` without the requested split, an unreachable Hub.
    """
    import datasets

    if not sys.stderr.isatty():  # carriage-return bars make unreadable log files (SLURM)
        datasets.disable_progress_bars()
    try:
        if spec.kind == "datasets_file":
            suffix = _suffix(Path(spec.target))
            extra: dict[str, Any] = {}
            if _DATASETS_BUILDERS[suffix] == "csv":  # text stays text: no "0" -> 0, no empty cell -> None
                delimiter = "\t" if suffix == ".tsv" else ","
                with open(spec.target, encoding="utf-8", newline="") as handle:
                    header = next(csv.reader(handle, delimiter=delimiter), [])
                features = datasets.Features({name: datasets.Value("string") for name in header})
                extra = {"delimiter": delimiter, "features": features, "keep_default_na": False}
            return datasets.load_dataset(_DATASETS_BUILDERS[suffix], data_files=spec.target, split="train", **extra)
        if spec.kind == "save_to_disk":
            loaded = datasets.load_from_disk(spec.target)
            if isinstance(loaded, datasets.DatasetDict):
                split = spec.split or "train"
                if split not in loaded:
                    raise DataSourceError(f"{spec.given}: no split {split!r} in this DatasetDict (splits: "
                                             f"{sorted(loaded)}); choose one with {spec.target}?split=NAME")
                return loaded[split]
            if spec.split is not None:
                raise DataSourceError(f"{spec.given}: ?split= given, but the folder holds a single Dataset")
            return loaded
        return datasets.load_dataset(spec.target, spec.config, split=spec.split, revision=spec.revision)
    except DataSourceError:
        raise
    except Exception as error:  # datasets raises many unrelated types (ConnectionError, DatasetNotFoundError, ...)
        detail = f"{type(error).__name__}: {error}".strip()
        if spec.kind == "hub":
            raise DataSourceError(
                f"{spec.given}: cannot load the Hub dataset {spec.target!r} ({detail}). Without network access, "
                "use a copy in the datasets cache (set HF_HUB_OFFLINE=1) or save it with "
                "datasets.load_dataset(...).save_to_disk(DIR) on a machine with access and pass DIR"
            ) from error
        raise DataSourceError(f"{spec.given}: cannot read it through datasets ({detail})") from error


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def source_identity(spec: SourceSpec) -> str:
    """What resume compares: the bytes of a file or folder; for the Hub, the dataset's ``datasets`` fingerprint
    (which follows the files of the resolved revision)."""
    if spec.kind in ("jsonl", "datasets_file"):
        return _file_sha256(Path(spec.target))
    if spec.kind == "save_to_disk":
        digest = hashlib.sha256()
        root = Path(spec.target)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(root).as_posix()}\0{_file_sha256(path)}\0".encode())
        return digest.hexdigest()
    return "datasets-fingerprint:" + open_dataset(spec)._fingerprint


def count_rows(spec: SourceSpec) -> int:
    """Rows of a source (JSON lines: non-blank lines, counted without parsing)."""
    try:
        if spec.kind == "jsonl":
            return sum(1 for _ in _data_lines(Path(spec.target)))
        return len(open_dataset(spec))
    except (OSError, EOFError) as error:
        raise DataSourceError(f"{spec.given}: cannot read ({error})") from error


def iter_rows(spec: SourceSpec, wanted: Callable[[int], bool] | None = None,
              expected_rows: int | None = None) -> Iterator[tuple[int, str, Any]]:
    """``(row index in the source, location, row)`` of every row (or those whose index ``wanted`` accepts), in order.
    A JSON line that does not parse comes as a ``MalformedRow``; the caller decides to raise or count it.

    Raises:
        DataSourceError: unreadable source; a JSON-lines file whose row count is no longer ``expected_rows``.
    """
    if spec.kind == "jsonl":
        index = 0
        try:
            for line_number, raw in _data_lines(Path(spec.target)):
                if wanted is None or wanted(index):
                    location = f"{spec.given}:{line_number}"
                    try:
                        yield index, location, json.loads(raw.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as error:
                        yield index, location, MalformedRow(f"{location}: not valid JSON ({error})")
                index += 1
        except (OSError, EOFError) as error:
            raise DataSourceError(f"{spec.given}: cannot read ({error})") from error
        if expected_rows is not None and index != expected_rows:
            raise DataSourceError(f"{spec.given}: changed while it was being read")
        return
    dataset = open_dataset(spec)
    if expected_rows is not None and len(dataset) != expected_rows:
        raise DataSourceError(f"{spec.given}: changed while it was being read")
    indices = [i for i in range(len(dataset)) if wanted is None or wanted(i)]
    for start in range(0, len(indices), 4096):  # in blocks: a Python dict per row only for a block at a time
        block = indices[start:start + 4096]
        for index, row in zip(block, dataset.select(block).to_list(), strict=True):
            yield index, f"{spec.given} row {index}", row
