"""Reading the input data of prealignment: each source's identity (for resume), row counts, and per-row
validation through the prompt format (``prompts``). The sources themselves (JSON lines, ``.json``/``.parquet``/
``.csv``/``.tsv`` files, ``save_to_disk`` folders, ``hf:NAME`` Hub datasets) are read by
``dskd_scale.utils.data_sources``.

Every row of the concatenated sources gets an ``example_index`` (0-based, in order), valid or not, so a row of
the output traces back to exactly one ``file:line`` (or ``file row N`` for formats without lines). Blank lines of
JSON-lines files carry no data and get no index. A bad row is an error naming its location or, with
``skip_bad_rows``, a counted drop. An empty response is always a counted drop.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from dskd_scale.prealign.prompts import RowError, RowRenderer
from dskd_scale.utils.data_sources import (
    DataSourceError,
    MalformedRow,
    count_rows,
    iter_rows,
    parse_spec,
    source_identity,
)

DROP_REASONS = ("malformed_json", "missing_field", "non_string_field", "empty_response", "bad_messages",
                "unused_field")


class PrealignInputError(ValueError):
    """Bad input data or tokenizer; the message names the file:line (or the path) and what is wrong."""


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input source: how it was given, its format, a content hash, and its span of example indices."""

    path: str
    sha256: str
    first_index: int
    rows: int
    kind: str = "jsonl"

    def as_manifest(self) -> dict:
        return {"path": self.path, "format": self.kind, "sha256": self.sha256, "first_example_index": self.first_index,
                "rows": self.rows}


@dataclass(frozen=True, slots=True)
class Example:
    """A valid instruction example: the prompt text, the response text, and where it came from."""

    example_index: int
    prompt: str
    response: str
    location: str


def scan_sources(paths: Sequence[str | os.PathLike]) -> list[SourceFile]:
    """Identify every source and count its rows (JSON lines: one cheap pass, nothing parsed).

    Raises:
        PrealignInputError: a source that does not exist or cannot be read.
    """
    sources: list[SourceFile] = []
    next_index = 0
    for given in paths:
        try:
            spec = parse_spec(given)
            rows, identity = count_rows(spec), source_identity(spec)
        except DataSourceError as error:
            raise PrealignInputError(str(error)) from error
        sources.append(SourceFile(str(given), identity, next_index, rows, spec.kind))
        next_index += rows
    return sources


def _source_rows(source: SourceFile, ranges: Sequence[tuple[int, int]]):
    """(example index, location, row) for the indices of ``source`` in ``ranges``."""
    def wanted(local: int) -> bool:
        return any(start <= source.first_index + local < stop for start, stop in ranges)

    for local, location, row in iter_rows(parse_spec(source.path), wanted, expected_rows=source.rows):
        yield source.first_index + local, location, row


def read_examples(
    sources: Sequence[SourceFile],
    index_ranges: Sequence[tuple[int, int]],
    *,
    renderer: RowRenderer,
    skip_bad_rows: bool,
) -> tuple[dict[int, Example], dict[int, str], dict[int, list[str]]]:
    """Parse the rows whose example index falls in one of ``index_ranges`` ([start, stop) pairs).

    Returns:
        ``(examples, drops, unused)``: valid examples by index, the drop reason of every other wanted index, and
        the row's text fields that no prompt or response uses (for rows that have some; see ``prompts``).

    Raises:
        PrealignInputError: a bad row (naming ``file:line`` or ``file row N``) unless ``skip_bad_rows``; a file
            that changed since ``scan_sources``.
    """
    examples: dict[int, Example] = {}
    drops: dict[int, str] = {}
    unused: dict[int, list[str]] = {}
    try:
        _read_into(sources, index_ranges, renderer, skip_bad_rows, examples, drops, unused)
    except DataSourceError as error:
        raise PrealignInputError(str(error)) from error
    return examples, drops, unused


def _read_into(sources: Sequence[SourceFile], index_ranges: Sequence[tuple[int, int]], renderer: RowRenderer,
               skip_bad_rows: bool, examples: dict[int, Example], drops: dict[int, str],
               unused: dict[int, list[str]]) -> None:
    for source in sources:
        ranges = [(start, stop) for start, stop in sorted(index_ranges)
                  if start < source.first_index + source.rows and stop > source.first_index]
        if not ranges:
            continue
        for index, location, row in _source_rows(source, ranges):
            try:
                if isinstance(row, MalformedRow):
                    raise RowError("malformed_json", row.message)
                prompt, response, unused_fields = renderer.render(row, location)
            except RowError as error:
                if error.reason == "empty_response" or skip_bad_rows:
                    drops[index] = error.reason
                    continue
                raise PrealignInputError(f"{error} (pass --skip-bad-rows to count and skip such rows)") from None
            examples[index] = Example(index, prompt, response, location)
            if unused_fields:
                unused[index] = unused_fields


def count_drops(drops: dict[int, str]) -> dict[str, int]:
    """Drop counts for every reason in ``DROP_REASONS`` (zeros included, fixed order)."""
    counts = Counter(drops.values())
    return {reason: counts.get(reason, 0) for reason in DROP_REASONS}
