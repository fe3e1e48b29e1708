"""Reading instruction data for prealignment: JSON-lines sources, checksums, and per-row validation.

Every non-blank line of the concatenated sources gets an ``example_index`` (0-based, in file order), whether
it is valid or not, so a row of the output traces back to exactly one ``file:line``. Blank lines carry no
data and get no index. A bad line (malformed JSON, a missing or non-string field) is an error naming
``file:line``, or, with ``skip_bad_rows``, a counted drop. An empty or whitespace-only response is always a
counted drop. A response given as a list of strings (Dolly's multi-reference ``output``) trains on the first.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DROP_REASONS = ("malformed_json", "missing_field", "non_string_field", "empty_response")


class PrealignInputError(ValueError):
    """Bad input data or tokenizer; the message names the file:line (or the path) and what is wrong."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input file: its path as given, sha256 of its bytes, and its span of example indices."""

    path: str
    sha256: str
    first_index: int
    rows: int

    def as_manifest(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "first_example_index": self.first_index, "rows": self.rows}


@dataclass(frozen=True, slots=True)
class Example:
    """A valid instruction example: the prompt text, the response text, and where it came from."""

    example_index: int
    prompt: str
    response: str
    location: str


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _data_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of every non-blank line."""
    with _open_binary(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield line_number, raw


def scan_sources(paths: Sequence[str | os.PathLike]) -> list[SourceFile]:
    """Hash every file and count its non-blank lines (one cheap pass; nothing is parsed).

    Raises:
        PrealignInputError: a path that does not exist or cannot be read.
    """
    sources: list[SourceFile] = []
    next_index = 0
    for given in paths:
        path = Path(given)
        if not path.is_file():
            raise PrealignInputError(f"{path}: data file not found")
        digest = hashlib.sha256()
        rows = 0
        try:
            with open(path, "rb") as handle:
                while block := handle.read(1 << 22):
                    digest.update(block)
            rows = sum(1 for _ in _data_lines(path))
        except OSError as error:
            raise PrealignInputError(f"{path}: cannot read ({error})") from error
        sources.append(SourceFile(str(given), digest.hexdigest(), next_index, rows))
        next_index += rows
    return sources


def parse_row(raw: bytes, location: str, prompt_field: str, response_field: str) -> tuple[str, str] | str:
    """Validate one JSON line.

    Returns:
        ``(prompt, response)`` for a usable row, otherwise the drop reason (one of ``DROP_REASONS``).

    Raises:
        PrealignInputError: never; callers decide between raising (via ``describe_drop``) and counting.
    """
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "malformed_json"
    if not isinstance(record, dict):
        return "malformed_json"
    if prompt_field not in record or response_field not in record:
        return "missing_field"
    prompt, response = record[prompt_field], record[response_field]
    if isinstance(response, list):
        # Dolly-style multi-reference output: the first reference is the training target.
        if not response:
            return "empty_response"
        response = response[0]
    if not isinstance(prompt, str) or not isinstance(response, str):
        return "non_string_field"
    if not response.strip():
        return "empty_response"
    return prompt, response


def describe_drop(reason: str, raw: bytes, location: str, prompt_field: str, response_field: str) -> str:
    """A user-facing message for a bad row, naming the file:line and the field."""
    if reason == "malformed_json":
        try:
            json.loads(raw.decode("utf-8"))
            detail = "the line is valid JSON but not an object"
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            detail = f"not valid JSON ({error})"
        return f"{location}: {detail}"
    record = json.loads(raw.decode("utf-8"))
    if reason == "missing_field":
        missing = [field for field in (prompt_field, response_field) if field not in record]
        return f"{location}: missing field {missing[0]!r} (fields present: {sorted(record)})"
    if reason == "non_string_field":
        for field in (prompt_field, response_field):
            value = record[field]
            if field == response_field and isinstance(value, list) and value:
                value = value[0]
            if not isinstance(value, str):
                kind = type(value).__name__
                return f"{location}: field {field!r} must be a string (or a list of strings), got {kind}"
    return f"{location}: {reason.replace('_', ' ')}"


def read_examples(
    sources: Sequence[SourceFile],
    index_ranges: Sequence[tuple[int, int]],
    *,
    prompt_field: str,
    response_field: str,
    skip_bad_rows: bool,
) -> tuple[dict[int, Example], dict[int, str]]:
    """Parse the rows whose example index falls in one of ``index_ranges`` ([start, stop) pairs).

    Returns:
        ``(examples, drops)``: valid examples by index, and the drop reason of every other wanted index.

    Raises:
        PrealignInputError: a malformed JSON line, missing or non-string field (naming ``file:line``) unless
            ``skip_bad_rows``; a file that changed since ``scan_sources``.
    """
    wanted = sorted(index_ranges)
    examples: dict[int, Example] = {}
    drops: dict[int, str] = {}
    for source in sources:
        if not any(start < source.first_index + source.rows and stop > source.first_index for start, stop in wanted):
            continue
        index = source.first_index
        for line_number, raw in _data_lines(Path(source.path)):
            if any(start <= index < stop for start, stop in wanted):
                location = f"{source.path}:{line_number}"
                parsed = parse_row(raw, location, prompt_field, response_field)
                if isinstance(parsed, tuple):
                    examples[index] = Example(index, parsed[0], parsed[1], location)
                elif parsed == "empty_response" or skip_bad_rows:
                    drops[index] = parsed
                else:
                    raise PrealignInputError(
                        describe_drop(parsed, raw, location, prompt_field, response_field)
                        + " (pass --skip-bad-rows to count and skip such rows)"
                    )
            index += 1
        if index != source.first_index + source.rows:
            raise PrealignInputError(f"{source.path}: changed while prealignment was reading it")
    return examples, drops


def count_drops(drops: dict[int, str]) -> dict[str, int]:
    """Drop counts for every reason in ``DROP_REASONS`` (zeros included, fixed order)."""
    counts = Counter(drops.values())
    return {reason: counts.get(reason, 0) for reason in DROP_REASONS}
