"""Reader for prealigned shards (docs/design.md Contract 1), refusing any shard that cannot be trusted.

``PrealignedDataset.open(dir, ...)`` checks, before any training starts, in this order:
1. the manifest's format name and version (``dskd_scale.data.format``);
2. the teacher/student tokenizer fingerprints against the configured tokenizers;
3. every shard file's sha256 against the manifest;
4. every row's structure (vectorised over all tokens): equal input-id/label lengths per side, labels either
   -100 or equal to the input id, token ids inside the manifest's vocabulary sizes, alignment lists of equal
   length with strictly increasing positions in ``[1, row length)``, and the manifest's row counts.
A failure raises ``DataError`` naming the file (and ``file:row`` / manifest field) at fault.

Storage: each list column of each Arrow record batch is used in place as one flat int32 value array plus row
offsets (no copy), so ``ds[i]`` is a few slices. By default the Parquet shards are decoded into memory in every
process (about 4 bytes per token per column, per rank). With ``cache_dir`` they are decoded once into Arrow IPC
files named by the shard's verified sha256 and memory-mapped, so the ranks of a node share one copy; a cache file
is trusted by its name (written atomically) and still passes the row checks below on every open.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dskd_scale.data import format as shard_format

__all__ = ["DataError", "PrealignedDataset", "LIST_COLUMNS"]

LIST_COLUMNS = shard_format.INT32_LIST_COLUMNS
IGNORE_INDEX = shard_format.IGNORE_INDEX


class DataError(ValueError):
    """Training data that cannot be used as given; the message names the file, row or field at fault."""


@dataclass(frozen=True)
class _FlatColumn:
    """Rows of a list column: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""

    values: np.ndarray  # [tokens] the shard's int dtype (int32 per Contract 1); may be a view of a memory map
    offsets: np.ndarray  # [rows + 1] int64

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


@dataclass(frozen=True)
class _Piece:
    """One Arrow record batch of a shard: its list columns (zero-copy views) and example indices."""

    columns: dict[str, _FlatColumn]
    example_index: np.ndarray  # [rows] int64


@dataclass(frozen=True)
class _Store:
    """Everything read from one prealigned folder; shared by all views (holdout splits) of it."""

    path: Path
    manifest: dict[str, Any]
    vocab_map: dict[str, np.ndarray]
    pieces: list[_Piece]
    piece_starts: np.ndarray  # [pieces] int64 first global row of each piece
    student_lengths: np.ndarray  # [rows] int64
    teacher_lengths: np.ndarray  # [rows] int64

    def example(self, row: int) -> dict[str, np.ndarray]:
        piece_id = int(np.searchsorted(self.piece_starts, row, side="right") - 1)
        piece, local = self.pieces[piece_id], row - int(self.piece_starts[piece_id])
        example = {name: column.row(local) for name, column in piece.columns.items()}
        example["example_index"] = piece.example_index[local]
        return example


class PrealignedDataset:
    """Random access to prealigned examples; a view over a subset of the rows of one opened folder.

    ``ds[i]`` -> dict of numpy int arrays: the six list columns of Contract 1 (int32) and ``example_index``
    (int64 scalar array). ``ds.lengths`` / ``ds.teacher_lengths``: ``[len(ds)]`` int64 token counts.
    """

    def __init__(self, store: _Store, rows: np.ndarray):
        self._store = store
        self._rows = rows.astype(np.int64, copy=False)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        expected_teacher_fingerprint: str | None,
        expected_student_fingerprint: str | None,
        validate_rows: bool = True,
        cache_dir: str | Path | None = None,
    ) -> PrealignedDataset:
        """Open and verify a ``tools/prealign.py`` output folder (see the module docstring for the checks).

        Args:
            path: the folder holding ``manifest.json``.
            expected_teacher_fingerprint, expected_student_fingerprint: ``format.tokenizer_fingerprint`` of the
                configured tokenizers; ``None`` skips that check (only for tools that have no tokenizer).
            validate_rows: run the per-row structural checks (O(tokens), vectorised).
            cache_dir: if set, each shard is decoded once into ``cache_dir/<shard sha256>.arrow`` (Arrow IPC,
                written atomically) and memory-mapped from there, so all ranks on a node share one copy in the
                page cache instead of each holding a decoded copy. Use node-local disk; safe to share between
                concurrent processes and runs (the name is the verified content hash).

        Raises:
            DataError: naming the file, row or manifest field at fault.
        """
        folder = Path(path)
        try:
            manifest = shard_format.read_manifest(folder)  # checks the format name and version
        except (OSError, ValueError) as err:
            raise DataError(str(err)) from err
        for side, expected in (("teacher", expected_teacher_fingerprint), ("student", expected_student_fingerprint)):
            _check_fingerprint(folder, manifest, side, expected)
        try:
            shard_format.verify_shards(folder)  # sha256 of every shard and of the vocabulary map
            vocab_map = shard_format.load_vocab_map(folder)
        except (OSError, ValueError) as err:
            raise DataError(str(err)) from err

        pieces: list[_Piece] = []
        for entry in manifest["shards"]:
            shard_path = folder / entry["file"]
            shard_pieces = _read_shard(shard_path, entry["sha256"], None if cache_dir is None else Path(cache_dir))
            rows = sum(piece.example_index.size for piece in shard_pieces)
            if rows != int(entry["rows"]):
                raise DataError(f"{shard_path}: has {rows} rows but manifest.json shards[].rows says {entry['rows']}")
            if validate_rows:
                first_row = 0
                for piece in shard_pieces:
                    _validate_rows(shard_path, piece, first_row, manifest)
                    first_row += piece.example_index.size
            pieces.extend(shard_pieces)
        if not pieces:
            raise DataError(f"{folder / 'manifest.json'}: lists no shards (or only empty ones)")
        piece_rows = np.array([piece.example_index.size for piece in pieces], dtype=np.int64)
        store = _Store(
            path=folder,
            manifest=manifest,
            vocab_map=vocab_map,
            pieces=pieces,
            piece_starts=np.cumsum(piece_rows) - piece_rows,
            student_lengths=np.concatenate([p.columns["student_input_ids"].lengths for p in pieces]),
            teacher_lengths=np.concatenate([p.columns["teacher_input_ids"].lengths for p in pieces]),
        )
        return cls(store, np.arange(int(piece_rows.sum())))

    # ---- access ---------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def manifest(self) -> dict[str, Any]:
        return self._store.manifest

    @property
    def vocab_map(self) -> dict[str, np.ndarray]:
        return self._store.vocab_map

    @property
    def rows(self) -> np.ndarray:
        """Row numbers of this view in the opened folder (all shards concatenated in manifest order)."""
        return self._rows

    @property
    def lengths(self) -> np.ndarray:
        """``[len(self)]`` int64 student token counts (for length grouping)."""
        return self._store.student_lengths[self._rows]

    @property
    def teacher_lengths(self) -> np.ndarray:
        return self._store.teacher_lengths[self._rows]

    def __len__(self) -> int:
        return int(self._rows.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} examples")
        return self._store.example(int(self._rows[i]))

    def split_holdout(self, holdout: float | int, *, seed: int) -> tuple[PrealignedDataset, PrealignedDataset]:
        """Split off a held-out evaluation set; deterministic by ``seed``, both views keep dataset order.

        Args:
            holdout: a fraction in (0, 1) of this view's examples, or an int count in [1, len(self)).
        Returns:
            ``(train, eval)`` views sharing this dataset's storage.
        """
        if isinstance(holdout, bool) or not isinstance(holdout, int | float):
            raise DataError(f"holdout must be a fraction in (0, 1) or an example count, got {holdout!r}")
        if isinstance(holdout, float):
            if not 0.0 < holdout < 1.0:
                raise DataError(f"holdout fraction must be in (0, 1), got {holdout}")
            count = max(1, round(holdout * len(self)))
        else:
            count = holdout
        if not 1 <= count < len(self):
            raise DataError(f"holdout of {holdout!r} gives {count} eval examples; need 1 <= count < {len(self)}")
        picked = np.zeros(len(self), dtype=bool)
        picked[np.random.default_rng([seed, len(self)]).permutation(len(self))[:count]] = True
        return PrealignedDataset(self._store, self._rows[~picked]), PrealignedDataset(self._store, self._rows[picked])

    def __repr__(self) -> str:
        return f"PrealignedDataset({str(self.path)!r}, examples={len(self)})"


# ---- checks ---------------------------------------------------------------------------------------------------


def _check_fingerprint(folder: Path, manifest: Mapping[str, Any], side: str, expected: str | None) -> None:
    if expected is None:
        return
    recorded = manifest.get(f"{side}_tokenizer", {}).get("fingerprint")
    if recorded != expected:
        name = manifest.get(f"{side}_tokenizer", {}).get("name_or_path")
        raise DataError(
            f"{folder / 'manifest.json'}: field '{side}_tokenizer.fingerprint' is {recorded!r} (tokenizer "
            f"{name!r}) but the configured {side} tokenizer's fingerprint is {expected!r}; these shards were "
            f"prealigned for a different {side} tokenizer. Re-run tools/prealign.py with the configured tokenizers"
        )


def _validate_rows(shard_path: Path, piece: _Piece, first_row: int, manifest: Mapping[str, Any]) -> None:
    """Structural checks of one record batch whose first row is row ``first_row`` of its shard file."""
    columns = piece.columns

    def fail(row: int, problem: str) -> None:
        raise DataError(f"{shard_path}:row {first_row + row}: {problem}")

    for side in ("student", "teacher"):
        ids, labels = columns[f"{side}_input_ids"], columns[f"{side}_labels"]
        bad = np.flatnonzero(ids.lengths != labels.lengths)
        if bad.size:
            fail(
                int(bad[0]),
                f"{side}_labels has {labels.lengths[bad[0]]} tokens, {side}_input_ids has {ids.lengths[bad[0]]}",
            )
        bad = np.flatnonzero((labels.values != IGNORE_INDEX) & (labels.values != ids.values))
        if bad.size:
            fail(_row_of(ids, bad[0]), f"{side}_labels must be -100 or equal to {side}_input_ids (not shifted)")
        vocab_size = manifest.get(f"{side}_tokenizer", {}).get("len")
        bad = np.flatnonzero((ids.values < 0) | ((ids.values >= vocab_size) if vocab_size else False))
        if bad.size:
            fail(_row_of(ids, bad[0]), f"{side}_input_ids holds id {ids.values[bad[0]]} outside [0, {vocab_size})")

    align_s, align_t = columns["align_student"], columns["align_teacher"]
    bad = np.flatnonzero(align_s.lengths != align_t.lengths)
    if bad.size:
        fail(
            int(bad[0]),
            f"align_student has {align_s.lengths[bad[0]]} positions, align_teacher {align_t.lengths[bad[0]]}",
        )
    for side, align in (("student", align_s), ("teacher", align_t)):
        row_of_pair = np.repeat(np.arange(align.lengths.size), align.lengths)
        row_length = columns[f"{side}_input_ids"].lengths[row_of_pair]
        bad = np.flatnonzero((align.values < 1) | (align.values >= row_length))
        if bad.size:
            fail(
                int(row_of_pair[bad[0]]),
                f"align_{side} position {align.values[bad[0]]} is outside [1, "
                f"{row_length[bad[0]]}) (positions index {side}_input_ids and must be >= 1)",
            )
        same_row = row_of_pair[1:] == row_of_pair[:-1]
        bad = np.flatnonzero(same_row & (np.diff(align.values.astype(np.int64)) <= 0))
        if bad.size:
            fail(int(row_of_pair[bad[0]]), f"align_{side} positions are not strictly increasing")


def _row_of(column: _FlatColumn, flat_position: int) -> int:
    return int(np.searchsorted(column.offsets, flat_position, side="right") - 1)


# ---- shard reading --------------------------------------------------------------------------------------------


def _read_shard(shard_path: Path, sha256: str, cache_dir: Path | None) -> list[_Piece]:
    """One shard as zero-copy record-batch pieces (rows in file order)."""
    if cache_dir is None:
        table = _parquet_table(shard_path)
    else:
        table = _cached_table(shard_path, cache_dir / f"{sha256}.arrow")
    missing = [name for name in (*LIST_COLUMNS, "example_index") if name not in table.column_names]
    if missing:
        raise DataError(f"{shard_path}: missing column(s) {missing} (has {table.column_names})")
    for name in LIST_COLUMNS:
        kind = table.schema.field(name).type
        if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)) or not pa.types.is_integer(kind.value_type):
            raise DataError(f"{shard_path}: column '{name}' has type {kind}, expected a list of integers")
    if not pa.types.is_integer(table.schema.field("example_index").type):
        raise DataError(f"{shard_path}: column 'example_index' has type {table.schema.field('example_index').type}")
    for name in (*LIST_COLUMNS, "example_index"):
        if table.column(name).null_count:
            raise DataError(f"{shard_path}: column '{name}' has null rows")
    table = table.select([*LIST_COLUMNS, "example_index"])
    return [
        _Piece(
            columns={name: _flat(shard_path, name, batch.column(name)) for name in LIST_COLUMNS},
            example_index=batch.column("example_index").to_numpy().astype(np.int64, copy=False),
        )
        for batch in table.to_batches()
        if batch.num_rows
    ]


def _parquet_table(shard_path: Path) -> pa.Table:
    try:
        return pq.read_table(shard_path, memory_map=True)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{shard_path}: cannot be read as Parquet: {err}") from err


def _cached_table(shard_path: Path, cached: Path) -> pa.Table:
    """The shard decoded into an Arrow IPC file at ``cached`` (made on first use), memory-mapped."""
    if not cached.is_file():
        table = _parquet_table(shard_path)
        # Write-then-rename: concurrent ranks may both decode, but a reader only ever sees a complete file.
        temporary = cached.with_name(f".{cached.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            os.replace(temporary, cached)
        except OSError as err:
            temporary.unlink(missing_ok=True)
            raise DataError(f"cannot write the decoded-shard cache {cached} (cache_dir): {err}") from err
    try:
        return pa.ipc.open_file(pa.memory_map(str(cached))).read_all()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{cached}: unreadable decoded-shard cache file ({err}); delete it to rebuild") from err


def _flat(shard_path: Path, name: str, array: pa.ListArray) -> _FlatColumn:
    # `flatten()` and a rebased `offsets` honour the slice an array may be (to_batches slices zero-copy).
    values = array.flatten()
    if values.null_count:
        raise DataError(f"{shard_path}: column '{name}' has null tokens inside its lists")
    offsets = array.offsets.to_numpy().astype(np.int64)
    return _FlatColumn(values=values.to_numpy(), offsets=offsets - offsets[0])
