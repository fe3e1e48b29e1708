"""PrealignedDataset: faithful reads, and refusal (naming the file/field) of shards that cannot be trusted."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from dskd_scale.data import DataError, PrealignedDataset
from dskd_scale.data import format as shard_format

COLUMNS = (*shard_format.INT32_LIST_COLUMNS, "example_index")


def test_reads_every_row_exactly_across_shards_and_row_groups(prealigned_dir, synthetic_rows, open_kw):
    rows = synthetic_rows(95)
    # Several shards (one short) and several row groups per shard exercise the piece lookup.
    ds = PrealignedDataset.open(prealigned_dir(rows, rows_per_shard=40, row_group_size=7), **open_kw)
    assert len(ds) == 95
    for i, row in enumerate(rows):
        example = ds[i]
        for name in COLUMNS:
            np.testing.assert_array_equal(example[name], row[name], err_msg=f"row {i} column {name}")
    np.testing.assert_array_equal(ds.lengths, [len(r["student_input_ids"]) for r in rows])
    np.testing.assert_array_equal(ds.teacher_lengths, [len(r["teacher_input_ids"]) for r in rows])
    assert ds[-1]["example_index"] == rows[-1]["example_index"]
    with pytest.raises(IndexError):
        ds[95]


def test_exposes_manifest_and_int64_vocab_map(prealigned_dir, open_kw):
    ds = PrealignedDataset.open(prealigned_dir(n=10), **open_kw)
    assert ds.manifest["student_tokenizer"]["fingerprint"] == open_kw["expected_student_fingerprint"]
    assert set(ds.vocab_map) == set(shard_format.VOCAB_MAP_KEYS)
    assert all(array.dtype == np.int64 for array in ds.vocab_map.values())


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_refuses_fingerprint_mismatch_naming_the_field(prealigned_dir, open_kw, side):
    folder = prealigned_dir(n=10)
    kw = dict(open_kw, **{f"expected_{side}_fingerprint": "0" * 64})
    with pytest.raises(DataError, match=rf"manifest\.json.*'{side}_tokenizer\.fingerprint'.*synthetic-{side}"):
        PrealignedDataset.open(folder, **kw)
    # None opts out of that check (tools without a tokenizer).
    assert len(PrealignedDataset.open(folder, **dict(open_kw, **{f"expected_{side}_fingerprint": None}))) == 10


def test_refuses_checksum_failure_naming_the_shard(prealigned_dir, open_kw):
    folder = prealigned_dir(n=100, rows_per_shard=40)
    shard = folder / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.parquet.*sha256"):
        PrealignedDataset.open(folder, **open_kw)


def test_refuses_unknown_format_version_naming_the_field(prealigned_dir, open_kw):
    folder = prealigned_dir(n=10, format_version=shard_format.FORMAT_VERSION + 1)
    with pytest.raises(DataError, match=r"manifest\.json.*format_version"):
        PrealignedDataset.open(folder, **open_kw)


def test_refuses_a_missing_shard(prealigned_dir, open_kw):
    folder = prealigned_dir(n=100, rows_per_shard=40)
    (folder / "shard-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"shard-00002\.parquet.*missing"):
        PrealignedDataset.open(folder, **open_kw)


def _corrupt_row(rows, column, value):
    rows[7][column] = value
    return rows


@pytest.mark.parametrize(
    "column, make_value, message",
    [
        ("student_labels", lambda r: r["student_input_ids"][1:] + [2], r"student_labels must be -100 or equal"),
        ("teacher_labels", lambda r: r["teacher_labels"][:-1], r"teacher_labels has \d+ tokens"),
        ("align_teacher", lambda r: r["align_teacher"][:-1], r"align_student has \d+ positions"),
        ("align_student", lambda r: [0] + r["align_student"][1:], r"align_student position 0 is outside"),
        (
            "align_teacher",
            lambda r: r["align_teacher"][:-1] + [len(r["teacher_input_ids"])],
            r"align_teacher .*outside",
        ),
        ("align_student", lambda r: r["align_student"][::-1], r"align_student positions are not strictly increasing"),
        ("student_input_ids", lambda r: [299 + 5] * len(r["student_input_ids"]), r"student_input_ids holds id 304"),
    ],
)
def test_refuses_malformed_rows_naming_file_and_row(
    prealigned_dir, synthetic_rows, open_kw, column, make_value, message
):
    rows = synthetic_rows(30)
    # Row 7 gets enough aligned pairs that reversing / truncating the alignment is a real change.
    rows[7] = {
        **rows[7],
        "student_input_ids": list(range(10, 30)),
        "student_labels": [-100] * 5 + list(range(15, 30)),
        "teacher_input_ids": list(range(10, 25)),
        "teacher_labels": [-100] * 3 + list(range(13, 25)),
        "align_student": [5, 8, 12, 19],
        "align_teacher": [3, 6, 9, 14],
    }
    if column == "student_input_ids":  # keep labels consistent so only the vocabulary check fires
        rows[7]["student_labels"] = [-100] * len(rows[7]["student_labels"])
    rows = _corrupt_row(rows, column, make_value(rows[7]))
    # Row groups of 3 put row 7 in the third record batch: the reported row must still be 7.
    folder = prealigned_dir(rows, rows_per_shard=20, row_group_size=3)
    with pytest.raises(DataError, match=rf"shard-00000\.parquet:row 7: {message}"):
        PrealignedDataset.open(folder, **open_kw)


def test_refuses_row_count_disagreeing_with_manifest(prealigned_dir, open_kw):
    folder = prealigned_dir(n=10)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 11
    shard_format.write_manifest(folder, manifest)
    with pytest.raises(DataError, match=r"shard-00000\.parquet.*11"):
        PrealignedDataset.open(folder, **open_kw)


def test_split_holdout_is_deterministic_disjoint_and_complete(prealigned_dir, open_kw):
    ds = PrealignedDataset.open(prealigned_dir(n=100), **open_kw)
    train, held = ds.split_holdout(0.1, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert set(train.rows).isdisjoint(held.rows) and set(train.rows) | set(held.rows) == set(range(100))
    again_train, again_held = ds.split_holdout(0.1, seed=3)
    np.testing.assert_array_equal(again_held.rows, held.rows)
    assert not np.array_equal(ds.split_holdout(0.1, seed=4)[1].rows, held.rows)
    # Views read the right rows and expose matching lengths.
    np.testing.assert_array_equal(held[0]["student_input_ids"], ds[int(held.rows[0])]["student_input_ids"])
    np.testing.assert_array_equal(held.lengths, ds.lengths[held.rows])
    assert len(ds.split_holdout(7, seed=0)[1]) == 7
    for bad in (0.0, 1.0, 0, 100, "10%"):
        with pytest.raises(DataError, match="holdout"):
            ds.split_holdout(bad, seed=0)


def test_cache_dir_memory_maps_decoded_shards_shared_by_content_hash(prealigned_dir, synthetic_rows, open_kw, tmp_path):
    rows = synthetic_rows(300, max_len=200)
    folder = prealigned_dir(rows, rows_per_shard=100)
    cache = tmp_path / "decoded"
    before = pa.total_allocated_bytes()
    in_memory = PrealignedDataset.open(folder, **open_kw)
    decoded_bytes = pa.total_allocated_bytes() - before
    first = PrealignedDataset.open(folder, cache_dir=cache, **open_kw)  # decodes and writes the cache
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{s['sha256']}.arrow" for s in manifest["shards"])
    before = pa.total_allocated_bytes()
    mapped = PrealignedDataset.open(folder, cache_dir=cache, **open_kw)
    # Mapped columns live in the page cache, not in this process's Arrow heap (the decoded copy does).
    assert decoded_bytes > 100_000 and pa.total_allocated_bytes() - before < decoded_bytes / 20
    for i in (0, 99, 100, 299):
        for name in COLUMNS:
            np.testing.assert_array_equal(mapped[i][name], in_memory[i][name])
            np.testing.assert_array_equal(first[i][name], rows[i][name])
