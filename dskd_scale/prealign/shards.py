"""Shard files of a prealignment run: deterministic Parquet writing, per-shard records, resume checks.

A shard ``shard-KKKKK.parquet`` holds the rows of the examples with index in ``shard_range(K)``, in index
order. Next to it, ``shard_stats/shard-KKKKK.json`` records the plan it was built for, its sha256, row count,
statistics and worst-aligned examples. Both are written to temporary names, fsynced and renamed, the record
last, so a shard counts as complete only if its record exists, names the current plan and its checksum still
matches; anything else is rebuilt on the next run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dskd_scale.data.format import (
    INT32_LIST_COLUMNS,
    atomic_write_bytes,
    canonical_json_bytes,
    file_sha256,
    fsync_directory,
    remove_stale_temporaries,
    shard_file_name,
    temporary_path,
)

SHARD_RECORD_DIR = "shard_stats"
SHARD_SCHEMA = pa.schema(
    [*(pa.field(name, pa.list_(pa.int32()), nullable=False) for name in INT32_LIST_COLUMNS),
     pa.field("example_index", pa.int64(), nullable=False)]
)


def shard_range(shard: int, num_shards: int, num_examples: int) -> tuple[int, int]:
    """[start, stop) of the example indices of ``shard``: contiguous, balanced, independent of the rank count."""
    return shard * num_examples // num_shards, (shard + 1) * num_examples // num_shards


def shard_record_path(out_dir: Path, shard: int) -> Path:
    return out_dir / SHARD_RECORD_DIR / shard_file_name(shard).replace(".parquet", ".json")


def rows_to_table(rows: list[dict[str, np.ndarray]], example_indices: list[int]) -> pa.Table:
    """Rows (dicts of 1-D int arrays, Contract 1 columns) -> an Arrow table with ``SHARD_SCHEMA``."""
    arrays = []
    for name in INT32_LIST_COLUMNS:
        parts = [row[name] for row in rows]
        lengths = np.fromiter((part.size for part in parts), dtype=np.int32, count=len(parts))
        offsets = np.zeros(len(parts) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32())))
    arrays.append(pa.array(np.asarray(example_indices, dtype=np.int64), type=pa.int64()))
    return pa.Table.from_arrays(arrays, schema=SHARD_SCHEMA)


def write_shard(out_dir: Path, shard: int, table: pa.Table) -> tuple[str, str]:
    """Write a shard atomically; returns (file name, sha256)."""
    name = shard_file_name(shard)
    final = out_dir / name
    temporary = temporary_path(final)
    # Fixed writer settings (no statistics timestamps exist in Parquet), so equal tables give equal bytes.
    pq.write_table(table, temporary, compression="zstd", row_group_size=4096, write_statistics=False)
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    fsync_directory(out_dir)
    return name, file_sha256(final)


def write_shard_record(out_dir: Path, shard: int, record: dict[str, Any]) -> None:
    path = shard_record_path(out_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, canonical_json_bytes(record))


def read_complete_record(out_dir: Path, shard: int, plan: str, *, record_file: Path | None = None,
                         file_keys: tuple[tuple[str, str], ...] = (("file", "sha256"),)) -> dict[str, Any] | None:
    """The shard's record if the shard is complete for ``plan`` and its files check out, else None.

    ``record_file`` (default: the prealignment record of ``shard``) names where the record lives and
    ``file_keys`` which ``(file name, sha256)`` fields of the record name the shard's files (the teacher cache's
    shards have two files).
    """
    path = record_file or shard_record_path(out_dir, shard)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("plan") != plan or record.get("shard") != shard:
        return None
    for file_key, sha_key in file_keys:
        shard_path = out_dir / str(record.get(file_key))
        if not shard_path.is_file() or file_sha256(shard_path) != record.get(sha_key):
            return None
    return record


def remove_leftovers(out_dir: Path, shard: int) -> None:
    """Delete temporary files a killed run left for ``shard`` (they are never read). Only the shard's owner calls
    this, so no other process is writing them."""
    remove_stale_temporaries(out_dir / shard_file_name(shard))
    remove_stale_temporaries(shard_record_path(out_dir, shard))


def remove_extra_shards(out_dir: Path, num_shards: int) -> list[str]:
    """Delete shards (records, temporary files) numbered >= ``num_shards`` from an earlier run with more shards."""
    removed = []
    names = {path.name.removeprefix(".").partition(".tmp-")[0] for path in out_dir.glob(".shard-*.parquet.tmp-*")}
    names |= {path.name for path in out_dir.glob("shard-*.parquet")}
    for name in sorted(names):
        number = name.removeprefix("shard-").removesuffix(".parquet")
        if number.isdigit() and int(number) >= num_shards:
            (out_dir / name).unlink(missing_ok=True)
            shard_record_path(out_dir, int(number)).unlink(missing_ok=True)
            remove_leftovers(out_dir, int(number))
            removed.append(name)
    return removed
