"""Evaluation data: one ``EvalExample`` per row, with ``file:line`` provenance for every example and every error.

Formats (those of the DSKD/MiniLLM data releases and of the original benchmark files):
- instruction following (Dolly/SelfInst/Vicuna/S-NI/UnNI): JSONL rows with ``prompt`` (the Alpaca-style prompt,
  already templated) and ``output`` (a string or a list of reference strings);
- GSM8K: JSONL rows with ``question`` and ``answer`` (ending in ``#### <number>``);
- HumanEval: JSONL (optionally ``.gz``) rows with ``task_id``, ``prompt``, ``test``, ``entry_point``;
- MBPP: the sanitized JSON list (or the original JSONL) with ``task_id``, ``prompt``/``text``, ``code``,
  ``test_list`` and optionally ``test_imports``.
Any of them may also come as Parquet/CSV/TSV, a ``datasets`` ``save_to_disk`` folder or a Hub dataset ``hf:NAME``
(``dskd_scale.utils.data_sources``); their rows are located as ``file row N``.
A malformed row raises ``DataError`` naming ``file:line`` or, with ``on_bad_row="skip"``, is counted in ``skipped``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dskd_scale.eval.answers import gsm8k_reference_answer
from dskd_scale.utils.data_sources import HUB_PREFIX, DataSourceError, MalformedRow, iter_rows, parse_spec


class DataError(ValueError):
    """A data file or row that cannot be evaluated; the message names ``file:line``."""


@dataclass(frozen=True, slots=True)
class EvalExample:
    """One prompt to complete. ``index`` is its row number in the source (stable key for seeds and tracing)."""

    index: int
    source: str
    prompt: str
    reference: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class LoadedSuite:
    examples: list[EvalExample]
    skipped: list[str]


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _rows(source: str | Path) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed row or the DataError to raise) for a JSONL file or a JSON list; other formats
    (Parquet, CSV, ``save_to_disk`` folders, ``hf:NAME``) through ``datasets``, located as ``file row N``."""
    path = Path(source)
    if not path.is_file() or _suffix(path) not in (".json", ".jsonl", ".jsonl.gz", ".json.gz"):
        if not path.exists() and not str(source).startswith(HUB_PREFIX) and "?" not in str(source):
            raise DataError(f"data file not found: {path}")
        yield from _dataset_rows(str(source))
        return
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from err
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        for number, row in enumerate(data):
            yield f"{path}[{number}]", row
        return
    with _open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, DataError(f"{where}: not valid JSON: {err.msg}")


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def _dataset_rows(source: str) -> Iterator[tuple[str, Any]]:
    try:
        for _, where, row in iter_rows(parse_spec(source)):
            yield where, DataError(row.message) if isinstance(row, MalformedRow) else row
    except DataSourceError as err:
        raise DataError(str(err)) from err


def _require(row: Any, where: str, **types: type | tuple[type, ...]) -> None:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name, expected in types.items():
        if name not in row:
            raise DataError(f"{where}: missing field '{name}' (fields: {', '.join(map(str, row))})")
        if not isinstance(row[name], expected):
            raise DataError(f"{where}: field '{name}' has type {type(row[name]).__name__}, expected {expected}")


def _load(path: str | Path, build: Callable[[int, str, Any], EvalExample], on_bad_row: str, limit: int | None):
    examples, skipped = [], []
    for index, (where, row) in enumerate(_rows(path)):
        if limit is not None and len(examples) >= limit:
            break
        try:
            if isinstance(row, DataError):
                raise row
            examples.append(build(index, where, row))
        except DataError as err:
            if on_bad_row != "skip":
                raise
            skipped.append(str(err))
    if not examples:
        raise DataError(f"{path}: no usable rows ({len(skipped)} skipped)")
    return LoadedSuite(examples, skipped)


def _instruction(index: int, where: str, row: Any) -> EvalExample:
    _require(row, where, prompt=str, output=(str, list))
    if not row["prompt"].strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    output = row["output"]
    if isinstance(output, list) and (not output or not all(isinstance(item, str) for item in output)):
        raise DataError(f"{where}: field 'output' must be a string or a non-empty list of strings")
    return EvalExample(index, where, row["prompt"], output)


def _gsm8k(index: int, where: str, row: Any) -> EvalExample:
    _require(row, where, question=str, answer=str)
    try:
        reference = gsm8k_reference_answer(row["answer"])
    except ValueError as err:
        raise DataError(f"{where}: {err}") from err
    return EvalExample(index, where, row["question"], reference, {"solution": row["answer"]})


def _humaneval(index: int, where: str, row: Any) -> EvalExample:
    _require(row, where, task_id=str, prompt=str, test=str, entry_point=str)
    extra = {"task_id": row["task_id"], "test": row["test"], "entry_point": row["entry_point"]}
    return EvalExample(index, where, row["prompt"], row.get("canonical_solution"), extra)


def _mbpp(index: int, where: str, row: Any) -> EvalExample:
    _require(row, where, task_id=int, code=str, test_list=list)
    text = row.get("prompt", row.get("text"))
    if not isinstance(text, str):
        raise DataError(f"{where}: missing field 'prompt' (or 'text' in the original MBPP format)")
    imports = row.get("test_imports", [])
    extra = {"task_id": row["task_id"], "test_list": list(row["test_list"]), "test_imports": list(imports)}
    return EvalExample(index, where, text, row["code"], extra)


def load_instruction_suite(path: str | Path, *, on_bad_row: str = "error", limit: int | None = None) -> LoadedSuite:
    return _load(path, _instruction, on_bad_row, limit)


def load_gsm8k(path: str | Path, *, on_bad_row: str = "error", limit: int | None = None) -> LoadedSuite:
    return _load(path, _gsm8k, on_bad_row, limit)


def load_humaneval(path: str | Path, *, on_bad_row: str = "error", limit: int | None = None) -> LoadedSuite:
    return _load(path, _humaneval, on_bad_row, limit)


def load_mbpp(
    path: str | Path, *, on_bad_row: str = "error", limit: int | None = None, test_ids: tuple[int, int] = (11, 510)
) -> tuple[LoadedSuite, list[EvalExample]]:
    """The MBPP test split (task ids in ``test_ids``, inclusive) and the prompting tasks 2, 3, 4 (Austin et al.)."""
    everything = _load(path, _mbpp, on_bad_row, None)
    low, high = test_ids
    test = [ex for ex in everything.examples if low <= ex.extra["task_id"] <= high]
    shots = [ex for task_id in (2, 3, 4) for ex in everything.examples if ex.extra["task_id"] == task_id]
    if not test:
        raise DataError(f"{path}: no MBPP task with id in [{low}, {high}]")
    return LoadedSuite(test[:limit] if limit else test, everything.skipped), shots


def as_examples(rows: list[EvalExample | Mapping[str, Any]]) -> list[EvalExample]:
    """Accept in-memory rows (``{"prompt": ..., "output": ...}``) as well as loaded examples."""
    examples = []
    for number, row in enumerate(rows):
        examples.append(row if isinstance(row, EvalExample) else _instruction(number, f"<rows>[{number}]", row))
    return examples
