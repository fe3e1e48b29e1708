"""Synthetic prealigned folders in exactly the Contract 1 layout, written with dskd_scale.data.format's helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dskd_scale.data import format as shard_format

STUDENT_VOCAB = 300
TEACHER_VOCAB = 500
TEACHER_FINGERPRINT = "t" * 64
STUDENT_FINGERPRINT = "s" * 64

_INT32_LIST = pa.list_(pa.int32())
SCHEMA = pa.schema([*((name, _INT32_LIST) for name in shard_format.INT32_LIST_COLUMNS), ("example_index", pa.int64())])


def synthetic_example(rng: np.random.Generator, index: int, *, min_len: int = 4, max_len: int = 60) -> dict:
    """One Contract 1 row: prompt (-100 labels) + response on each side, aligned response positions >= 1."""
    row = {"example_index": index}
    response_positions = {}
    # Teacher length follows the student's (same text, similar tokenizers), as in real data.
    student_length = int(rng.integers(min_len, max_len + 1))
    teacher_length = int(np.clip(student_length + rng.integers(-3, 4), min_len, max_len))
    for side, vocab, length in (("student", STUDENT_VOCAB, student_length), ("teacher", TEACHER_VOCAB, teacher_length)):
        ids = rng.integers(3, vocab, size=length)
        prompt = int(rng.integers(1, length))  # at least the first token is prompt/BOS, so positions are >= 1
        labels = ids.copy()
        labels[:prompt] = -100
        row[f"{side}_input_ids"], row[f"{side}_labels"] = ids.tolist(), labels.tolist()
        response_positions[side] = np.arange(prompt, length)
    pairs = int(rng.integers(0, min(map(len, response_positions.values())) + 1))
    for side, positions in response_positions.items():
        row[f"align_{side}"] = np.sort(rng.choice(positions, size=pairs, replace=False)).tolist()
    return row


def write_prealigned(
    folder: Path,
    rows: list[dict],
    *,
    rows_per_shard: int = 40,
    format_version: int = shard_format.FORMAT_VERSION,
    row_group_size: int | None = None,
) -> Path:
    """Write ``rows`` as shards + vocab map + manifest; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard_id, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start : start + rows_per_shard]
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        path = folder / shard_format.shard_file_name(shard_id)
        pq.write_table(table, path, row_group_size=row_group_size)
        shards.append({"file": path.name, "rows": len(chunk), "sha256": shard_format.file_sha256(path)})
    teacher_to_student = np.full(TEACHER_VOCAB, -1, dtype=np.int64)
    teacher_to_student[:STUDENT_VOCAB] = np.arange(STUDENT_VOCAB)
    vocab_entry = shard_format.save_vocab_map(
        folder,
        {
            "teacher_to_student": teacher_to_student,
            "student_to_teacher": np.arange(STUDENT_VOCAB, dtype=np.int64),
            "overlap_teacher_ids": np.arange(STUDENT_VOCAB, dtype=np.int64),
            "overlap_student_ids": np.arange(STUDENT_VOCAB, dtype=np.int64),
        },
    )

    def tokenizer(fingerprint: str, vocab: int, name: str) -> dict:
        return {
            "fingerprint": fingerprint,
            "name_or_path": name,
            "len": vocab,
            "eos_token_id": 2,
            "bos_token_id": 1,
            "pad_token_id": None,
        }

    manifest = {
        "format": shard_format.FORMAT_NAME,
        "format_version": format_version,
        "teacher_tokenizer": tokenizer(TEACHER_FINGERPRINT, TEACHER_VOCAB, "synthetic-teacher"),
        "student_tokenizer": tokenizer(STUDENT_FINGERPRINT, STUDENT_VOCAB, "synthetic-student"),
        "sources": [],
        "max_length": 64,
        "truncation": "drop",
        "shards": shards,
        "vocab_map": vocab_entry,
        "stats": {"rows": len(rows)},
    }
    shard_format.write_manifest(folder, manifest)
    return folder


@pytest.fixture
def synthetic_rows():
    """``synthetic_rows(n, seed=0, **length_kw)`` -> list of Contract 1 rows."""

    def make(n: int, seed: int = 0, **length_kw) -> list[dict]:
        rng = np.random.default_rng(seed)
        return [synthetic_example(rng, 1000 + i, **length_kw) for i in range(n)]

    return make


@pytest.fixture
def prealigned_dir(tmp_path, synthetic_rows):
    """``prealigned_dir(rows=None, n=100, **write_kw)`` -> folder of a valid synthetic prealigned output."""

    def make(rows: list[dict] | None = None, n: int = 100, name: str = "prealigned", **write_kw) -> Path:
        return write_prealigned(tmp_path / name, synthetic_rows(n) if rows is None else rows, **write_kw)

    return make


@pytest.fixture
def open_kw() -> dict:
    return {"expected_teacher_fingerprint": TEACHER_FINGERPRINT, "expected_student_fingerprint": STUDENT_FINGERPRINT}
