"""dskd_scale.data.format: fingerprints, manifest checks, shard checksums, vocabulary map I/O."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from dskd_scale.data import format as shard_format
from dskd_scale.data.format import ShardFormatError


def test_fingerprint_identifies_tokenizer_behaviour(demo, load_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    teacher = load_tokenizer(demo["teacher_tokenizer"])
    student = load_tokenizer(demo["student_tokenizer"])
    fresh_teacher = AutoTokenizer.from_pretrained(demo["teacher_tokenizer"])
    assert shard_format.tokenizer_fingerprint(teacher) == shard_format.tokenizer_fingerprint(fresh_teacher)
    assert shard_format.tokenizer_fingerprint(teacher) != shard_format.tokenizer_fingerprint(student)

    # Runtime padding/truncation state is not identity...
    before = shard_format.tokenizer_fingerprint(fresh_teacher)
    fresh_teacher(["a b", "a"], padding=True, truncation=True, max_length=4)
    assert shard_format.tokenizer_fingerprint(fresh_teacher) == before
    # ...but an added token, a changed special token or a changed vocabulary is.
    fresh_teacher.add_tokens(["<extra>"])
    assert shard_format.tokenizer_fingerprint(fresh_teacher) != before
    other_eos = AutoTokenizer.from_pretrained(demo["teacher_tokenizer"], eos_token="<|pad|>")
    assert shard_format.tokenizer_fingerprint(other_eos) != before


def test_fingerprint_refuses_slow_tokenizer():
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    with pytest.raises(TypeError, match="slow-one"):
        shard_format.tokenizer_fingerprint(Slow())


def _write_minimal_output(directory, rows=3):
    """A valid output folder with one shard, written through the format's own writers."""
    from dskd_scale.prealign.shards import rows_to_table, write_shard

    row = {name: np.arange(1, 5, dtype=np.int32) for name in shard_format.INT32_LIST_COLUMNS}
    table = rows_to_table([row] * rows, list(range(rows)))
    name, sha256 = write_shard(directory, 0, table)
    vocab_entry = shard_format.save_vocab_map(directory, {
        "teacher_to_student": np.array([1, -1, 0]), "student_to_teacher": np.array([2, 0]),
        "overlap_teacher_ids": np.array([0, 2]), "overlap_student_ids": np.array([1, 0]),
    })
    manifest = {
        "format": shard_format.FORMAT_NAME, "format_version": shard_format.FORMAT_VERSION,
        "teacher_tokenizer": {"fingerprint": "t"}, "student_tokenizer": {"fingerprint": "s"}, "sources": [],
        "max_length": 8, "truncation": {}, "shards": [{"file": name, "rows": rows, "sha256": sha256}],
        "vocab_map": vocab_entry, "stats": {},
    }
    shard_format.write_manifest(directory, manifest)
    return manifest


def test_verify_shards_accepts_intact_output_and_names_corrupted_file(tmp_path):
    manifest = _write_minimal_output(tmp_path)
    assert shard_format.verify_shards(tmp_path)["shards"] == manifest["shards"]

    shard = tmp_path / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match=r"shard-00000\.parquet: sha256 .* does not match"):
        shard_format.verify_shards(tmp_path)

    shard.unlink()
    with pytest.raises(ShardFormatError, match=r"shard-00000\.parquet: listed in manifest.json but missing"):
        shard_format.verify_shards(tmp_path)


def test_verify_shards_checks_row_count_and_vocab_map(tmp_path):
    manifest = _write_minimal_output(tmp_path, rows=3)
    wrong_rows = copy.deepcopy(manifest)
    wrong_rows["shards"][0]["rows"] = 4
    shard_format.write_manifest(tmp_path, wrong_rows)
    with pytest.raises(ShardFormatError, match="holds 3 rows, the manifest says 4"):
        shard_format.verify_shards(tmp_path)

    shard_format.write_manifest(tmp_path, manifest)
    (tmp_path / shard_format.VOCAB_MAP_FILE).write_bytes(b"garbage")
    with pytest.raises(ShardFormatError, match="vocab_map.safetensors: sha256"):
        shard_format.verify_shards(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=shard_format.FORMAT_VERSION + 1), "format_version 2 is not supported"),
        (lambda m: m.update(format="something.else"), "format is 'something.else'"),
        (lambda m: m.pop("shards"), r"missing keys \['shards'\]"),
    ],
)
def test_read_manifest_refuses_unknown_format(tmp_path, change, message):
    manifest = _write_minimal_output(tmp_path)
    change(manifest)
    shard_format.write_manifest(tmp_path, manifest)
    with pytest.raises(ShardFormatError, match=message) as caught:
        shard_format.read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(caught.value)


def test_read_manifest_missing_or_not_json(tmp_path):
    with pytest.raises(ShardFormatError, match="no manifest"):
        shard_format.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardFormatError, match="not valid JSON"):
        shard_format.read_manifest(tmp_path)


def test_vocab_map_round_trip_is_int64(tmp_path):
    _write_minimal_output(tmp_path)
    arrays = shard_format.load_vocab_map(tmp_path)
    assert set(arrays) == set(shard_format.VOCAB_MAP_KEYS)
    assert all(a.dtype == np.int64 and a.ndim == 1 for a in arrays.values())
    np.testing.assert_array_equal(arrays["teacher_to_student"], [1, -1, 0])
    np.testing.assert_array_equal(arrays["overlap_student_ids"], [1, 0])

    from safetensors.numpy import save_file

    save_file({"teacher_to_student": np.zeros(2, dtype=np.int64)}, str(tmp_path / shard_format.VOCAB_MAP_FILE))
    with pytest.raises(ShardFormatError, match="lacks tensors"):
        shard_format.load_vocab_map(tmp_path)


def test_check_tokenizer_refuses_other_tokenizer(demo, load_tokenizer):
    teacher = load_tokenizer(demo["teacher_tokenizer"])
    student = load_tokenizer(demo["student_tokenizer"])
    manifest = {"teacher_tokenizer": shard_format.tokenizer_record(teacher)}
    shard_format.check_tokenizer(manifest, "teacher", teacher)
    with pytest.raises(ShardFormatError, match="teacher tokenizer .* is not the one the shards were built with"):
        shard_format.check_tokenizer(manifest, "teacher", student)


def test_manifest_write_is_atomic_and_deterministic(tmp_path):
    manifest = _write_minimal_output(tmp_path)
    first = (tmp_path / "manifest.json").read_bytes()
    shard_format.write_manifest(tmp_path, json.loads(first))
    assert (tmp_path / "manifest.json").read_bytes() == first
    assert not list(tmp_path.glob(".manifest.json.tmp-*"))
    assert json.loads(first) == manifest
