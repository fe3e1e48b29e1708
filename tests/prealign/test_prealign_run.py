"""Whole runs: demo end to end, manifest fields, resume after a crash, MPI and worker-pool byte equality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dskd_scale.data import format as shard_format
from dskd_scale.prealign.pipeline import PrealignConfig, PrealignError, run_prealign
from dskd_scale.prealign.shards import shard_record_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _config(demo, out: Path, **overrides) -> PrealignConfig:
    settings = {"teacher_tokenizer": str(demo["teacher_tokenizer"]),
                "student_tokenizer": str(demo["student_tokenizer"]), "data": (str(demo["train"]),),
                "out": str(out), "max_length": 96, "num_shards": 3, "workers": 1, "chunk_examples": 50}
    settings.update(overrides)
    return PrealignConfig(**settings)


def _output_bytes(out: Path) -> dict[str, bytes]:
    """Every file of an output folder (shards, records, vocab map, report, manifest) by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(demo, tmp_path_factory):
    """One single-process run over the demo's train split, shared by the comparisons below."""
    out = tmp_path_factory.mktemp("reference")
    manifest = run_prealign(_config(demo, out))
    return out, manifest


def test_demo_end_to_end_manifest_and_shards(reference_run, demo, load_tokenizer):
    out, manifest = reference_run
    assert shard_format.verify_shards(out) == manifest
    teacher, student = load_tokenizer(demo["teacher_tokenizer"]), load_tokenizer(demo["student_tokenizer"])
    assert manifest["teacher_tokenizer"]["fingerprint"] == shard_format.tokenizer_fingerprint(teacher)
    assert manifest["student_tokenizer"]["len"] == len(student)
    assert manifest["student_tokenizer"]["bos_token_id"] == student.bos_token_id is not None
    assert manifest["sources"] == [{"path": str(demo["train"]), "format": "jsonl", "rows": 400,
                                    "sha256": shard_format.file_sha256(demo["train"]), "first_example_index": 0}]
    assert manifest["max_length"] == 96 and "prompt cut from the left" in manifest["truncation"]["policy"]
    stats = manifest["stats"]
    assert stats["examples"] == 400 and stats["dropped_examples"]["total"] == 0
    assert [shard["rows"] for shard in manifest["shards"]] == [133, 133, 134]
    assert 0.5 < stats["coverage"] <= 1.0 and stats["coverage_vs_optimum"] == 1.0
    assert 0.0 < stats["teacher_vocab_mapped_fraction"] < 1.0
    assert manifest["alignment"] == {"whitespace": "exact"}
    assert stats["coverage_other_whitespace"] >= stats["coverage"]  # paper mode pairs a superset

    table = pq.read_table(out / manifest["shards"][1]["file"])
    assert table.column("example_index").to_pylist() == list(range(133, 266))
    row = {name: table.column(name)[0].as_py() for name in shard_format.INT32_LIST_COLUMNS}
    assert row["student_input_ids"][0] == student.bos_token_id  # the unigram student adds BOS
    assert row["teacher_input_ids"][-1] == teacher.eos_token_id and row["student_input_ids"][-1] == student.eos_token_id
    assert row["align_student"][-1] == len(row["student_input_ids"]) - 1  # EOS <-> EOS
    total_pairs = sum(len(v) for v in pq.read_table(out / "shard-00000.parquet").column("align_student").to_pylist())
    assert total_pairs > 0

    vocab = shard_format.load_vocab_map(out)
    assert vocab["teacher_to_student"].shape == (len(teacher),) and vocab["student_to_teacher"].shape == (len(student),)
    mapped = vocab["teacher_to_student"] >= 0
    assert mapped.mean() == pytest.approx(stats["teacher_vocab_mapped_fraction"], abs=1e-6)


def test_report_renders_worst_examples(reference_run, capsys):
    out, manifest = reference_run
    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    try:
        import alignment_report
    finally:
        sys.path.pop(0)
    assert alignment_report.main([str(out), "--verify", "--examples", "2"]) == 0
    text = capsys.readouterr().out
    assert f"{manifest['stats']['aligned_pairs']} aligned pairs" in text
    assert text.count("    student:  ") == 2 and "<eos>" in text and "[" in text  # unaligned tokens bracketed
    assert "match their checksums" in text


def test_resume_skips_complete_shards_and_redoes_broken_ones(reference_run, demo, tmp_path):
    reference, _ = reference_run
    out = tmp_path / "resumed"
    run_prealign(_config(demo, out))
    # Simulate a crash: shard 1 half-written (wrong bytes under the final name), shard 2 renamed but its record
    # never written, a temporary file left behind, and no manifest.
    shard1 = out / "shard-00001.parquet"
    shard1.write_bytes(shard1.read_bytes()[: shard1.stat().st_size // 2])
    shard_record_path(out, 2).unlink()
    (out / ".shard-00002.parquet.tmp-999").write_bytes(b"partial")
    (out / "manifest.json").unlink()
    untouched = (out / "shard-00000.parquet").stat().st_mtime_ns

    run_prealign(_config(demo, out))
    assert (out / "shard-00000.parquet").stat().st_mtime_ns == untouched  # complete shard skipped
    assert _output_bytes(out) == _output_bytes(reference)  # broken ones rebuilt, leftovers gone

    # Other settings make every shard stale: nothing from the old plan is reused or left behind.
    manifest = run_prealign(_config(demo, out, max_length=80, num_shards=2))
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert not (out / "shard-00002.parquet").exists()
    assert (out / "shard-00000.parquet").stat().st_mtime_ns != untouched


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the run may catch it."""


def test_a_run_killed_while_writing_the_vocabulary_map_leaves_no_stale_file_after_the_rerun(
        reference_run, demo, tmp_path, monkeypatch):
    reference, _ = reference_run
    out = tmp_path / "killed"
    real_replace = os.replace

    def killed_at_the_vocab_map_rename(source, target):
        if Path(target).name == shard_format.VOCAB_MAP_FILE:
            raise _Killed()
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_vocab_map_rename)
    with pytest.raises(_Killed):
        run_prealign(_config(demo, out))
    monkeypatch.undo()
    hidden = sorted(path.name for path in out.rglob(".*"))
    assert hidden == [f".{shard_format.VOCAB_MAP_FILE}.tmp-{os.getpid()}"]  # what the kill leaves
    # Leftovers of other killed processes, beside complete files, are also removed.
    (out / ".manifest.json.tmp-424242").write_bytes(b"{")
    (out / ".shard-00000.parquet.tmp-424242").write_bytes(b"PAR1")
    (out / ".shard-00007.parquet.tmp-424242").write_bytes(b"PAR1")  # from an earlier run with more shards
    (out / "shard_stats" / ".shard-00001.json.tmp-424242").write_bytes(b"{")

    run_prealign(_config(demo, out))
    assert sorted(path.name for path in out.rglob(".*")) == []
    assert _output_bytes(out) == _output_bytes(reference)


def test_worker_pool_output_is_byte_identical(reference_run, demo, tmp_path):
    reference, _ = reference_run
    run_prealign(_config(demo, tmp_path, workers=2, chunk_examples=37))
    assert _output_bytes(tmp_path) == _output_bytes(reference)


@pytest.mark.dist
def test_mpi_two_ranks_byte_identical_to_single_process(reference_run, demo, tmp_path):
    reference, _ = reference_run
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"{mpiexec} not installed (PyPI mpich)")
    command = [str(mpiexec), "-n", "2", sys.executable, str(PROJECT_ROOT / "tools" / "prealign.py"),
               "--teacher-tokenizer", str(demo["teacher_tokenizer"]), "--student-tokenizer",
               str(demo["student_tokenizer"]), "--data", str(demo["train"]), "--out", str(tmp_path),
               "--max-length", "96", "--num-shards", "3", "--workers", "1", "--chunk-examples", "50"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # Rank 0 logs its own shards (0 and 2); shard 1 was rank 1's work.
    assert "rank 0 wrote shard-00002.parquet" in result.stderr and "rank 0 wrote shard-00001" not in result.stderr
    assert _output_bytes(tmp_path) == _output_bytes(reference)
    assert json.loads((tmp_path / "manifest.json").read_text())["stats"]["examples"] == 400


class _TwoRankView:
    """Rank 0 of a two-rank group whose other rank reports ``other_error`` at every collective."""

    rank, size = 0, 2

    def __init__(self, other_error):
        self.other_error = other_error

    def allgather(self, value):
        return [value, self.other_error]

    def barrier(self):
        return None


def test_failure_on_another_rank_fails_this_rank_without_manifest(demo, tmp_path):
    with pytest.raises(PrealignError, match="prealignment failed on another rank: rank 1: data.jsonl:7: boom"):
        run_prealign(_config(demo, tmp_path, num_shards=2), group=_TwoRankView("rank 1: data.jsonl:7: boom"))
    assert (tmp_path / "shard-00000.parquet").exists()  # its own shard is kept for the resumed run
    assert not (tmp_path / "manifest.json").exists()


def test_paper_whitespace_run_records_its_mode_and_both_coverages(reference_run, demo, tmp_path):
    """`tools/prealign.py --whitespace paper`: the manifest says so, its coverage is what the exact run reported
    for the other mode, and the report prints both."""
    exact = reference_run[1]["stats"]
    out = tmp_path / "paper"
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "tools/prealign.py"), "--teacher-tokenizer", str(demo["teacher_tokenizer"]),
         "--student-tokenizer", str(demo["student_tokenizer"]), "--data", str(demo["train"]), "--out", str(out),
         "--max-length", "96", "--num-shards", "3", "--workers", "1", "--chunk-examples", "50",
         "--whitespace", "paper"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = shard_format.verify_shards(out)
    stats = manifest["stats"]
    assert manifest["alignment"] == {"whitespace": "paper"} and stats["coverage_vs_optimum"] == 1.0
    assert stats["aligned_pairs"] == exact["other_whitespace_pairs"]
    assert stats["other_whitespace_pairs"] == exact["aligned_pairs"]
    assert "whitespace paper (used)" in done.stdout and "whitespace exact would give" in done.stdout
    bad = subprocess.run([sys.executable, str(PROJECT_ROOT / "tools/prealign.py"), "--whitespace", "loose"],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert bad.returncode == 2 and "--whitespace" in bad.stderr
