"""Writing a teacher cache: two ranks write the bytes one rank writes; a killed write leaves no usable cache and a
rerun resumes it to the same bytes; a rerun rebuilds exactly the damaged shards and follows changed settings.

Ports 29770-29779.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cache_helpers import PROJECT_ROOT, check, run_env, run_tool, shard_bytes, tool_command, write_cache

from dskd_scale.teacher_cache import CacheMismatch, TeacherCache, data_fingerprint, teacher_fingerprint


def _open(demo: dict, folder: Path) -> TeacherCache:
    return TeacherCache.open(folder, teacher_fingerprint=teacher_fingerprint(demo["teacher"]),
                             data_fingerprint=data_fingerprint(demo["eta"]), hidden_size=48)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rank0_shards(result) -> list[int]:
    """The shards rank 0 reports writing (only rank 0 logs)."""
    return [int(m) for m in re.findall(r"rank 0 wrote shard (\d+)", result.stdout + result.stderr)]


def test_two_ranks_write_the_same_cache_as_one(cache_demo, tmp_path):
    settings = ("--mode", "all_positions", "--dtype", "fp8_e4m3", "--num-shards", "5", "--batch-size", "3")
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_tool(tool_command(cache_demo, one, *settings))
    check(single)
    double = run_tool(tool_command(cache_demo, two, *settings, ranks=2, port=29770))
    check(double)
    assert _rank0_shards(double) == [0, 2, 4]  # the work was split: rank 1 wrote shards 1 and 3
    assert shard_bytes(one) == shard_bytes(two) and len(shard_bytes(one)) == 10
    assert _manifest(one)["shards"] == _manifest(two)["shards"]
    assert "bytes per cached token: bf16 100, fp8_e4m3 56" in single.stdout
    cache = _open(cache_demo, two)
    assert cache.num_examples == 24 and cache.mode == "all_positions"
    # The in-process writer (same settings) gives the same bytes too.
    library = tmp_path / "library"
    write_cache(cache_demo, library, mode="all_positions", dtype="fp8_e4m3", num_shards=5, batch_size=3)
    assert shard_bytes(library) == shard_bytes(one)


def test_two_mpi_ranks_write_the_same_cache_as_one(cache_demo, tmp_path):
    """The srun/mpiexec path (MPI process group of dskd_scale.prealign.process_group)."""
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip(f"{mpiexec} not installed (PyPI mpich)")
    out = tmp_path / "mpi"
    command = tool_command(cache_demo, out, "--num-shards", "3", "--batch-size", "2")
    result = run_tool([str(mpiexec), "-n", "2", *command])
    check(result)
    assert _rank0_shards(result) == [0, 2]
    reference = tmp_path / "reference"
    write_cache(cache_demo, reference, num_shards=3, batch_size=2)
    assert shard_bytes(out) == shard_bytes(reference)
    assert _manifest(out)["shards"] == _manifest(reference)["shards"]


def test_a_killed_write_is_refused_then_resumes_to_the_same_bytes(cache_demo, tmp_path):
    out = tmp_path / "killed"
    command = tool_command(cache_demo, out, "--num-shards", "24", "--batch-size", "1")
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    try:
        while not list((out / "records").glob("shard-*.json")) and process.poll() is None:
            assert time.monotonic() < deadline, "no shard was written within 180 s"
            time.sleep(0.002)
        still_running = process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert still_running, "the write finished before it could be killed (make the run longer)"
    written = len(list((out / "records").glob("shard-*.json")))
    assert 1 <= written < 24
    assert not (out / "manifest.json").exists()
    with pytest.raises(CacheMismatch, match="manifest.json"):
        _open(cache_demo, out)

    resumed = run_tool(command)
    check(resumed)
    assert f"{written} of its 24 shards are complete and checksum-valid; skipping them" in resumed.stderr
    assert not list(out.rglob(".*.tmp-*"))
    clean = tmp_path / "clean"
    write_cache(cache_demo, clean, num_shards=24, batch_size=1)
    assert shard_bytes(out) == shard_bytes(clean)
    assert _open(cache_demo, out).num_examples == 24


def test_a_rerun_rebuilds_exactly_the_damaged_shards(cache_demo, tmp_path):
    out = tmp_path / "cache"
    write_cache(cache_demo, out, num_shards=4, dtype="fp8_e4m3")
    original = shard_bytes(out)
    stamps = {path.name: path.stat().st_mtime_ns for path in out.iterdir() if path.is_file()}
    # What a crash leaves: no manifest (rank 0 writes it last), a shard whose record is gone, a half-written
    # hidden file under its final name is impossible (renamed when complete) but a changed one is caught by its
    # checksum, and a temporary file of a killed writer.
    (out / "manifest.json").unlink()
    (out / "records" / "shard-00001.json").unlink()
    damaged = out / "hidden-00002.bin"
    damaged.write_bytes(damaged.read_bytes()[:-7])
    leftover = out / ".hidden-00003.bin.tmp-99999"
    leftover.write_bytes(b"partial")
    write_cache(cache_demo, out, num_shards=4, dtype="fp8_e4m3")
    assert shard_bytes(out) == original
    assert not leftover.exists()
    rewritten = {name for name, stamp in stamps.items() if (out / name).stat().st_mtime_ns != stamp}
    assert rewritten == {"hidden-00001.bin", "index-00001.safetensors", "hidden-00002.bin",
                         "index-00002.safetensors", "manifest.json"}
    assert _open(cache_demo, out).num_examples == 24


def test_changed_settings_rebuild_and_drop_extra_shards(cache_demo, tmp_path):
    out = tmp_path / "cache"
    write_cache(cache_demo, out, num_shards=4, dtype="bf16")
    write_cache(cache_demo, out, num_shards=2, dtype="fp8_e4m3")
    assert sorted(path.name for path in out.glob("hidden-*.bin")) == ["hidden-00000.bin", "hidden-00001.bin"]
    assert sorted(path.name for path in (out / "records").iterdir()) == ["shard-00000.json", "shard-00001.json"]
    fresh = tmp_path / "fresh"
    write_cache(cache_demo, fresh, num_shards=2, dtype="fp8_e4m3")
    assert shard_bytes(out) == shard_bytes(fresh)
    assert _open(cache_demo, out).dtype == "fp8_e4m3"


def test_tool_reads_the_run_config(cache_demo, tmp_path):
    """``--config`` with dotted overrides takes the teacher and data.train_dir from the run config."""
    out = tmp_path / "from_config"
    overrides = [f"teacher.path={cache_demo['teacher']}", f"teacher.tokenizer={cache_demo['teacher_tokenizer']}",
                 "teacher.architecture=", f"student.tokenizer={cache_demo['student_tokenizer']}",
                 f"data.train_dir={cache_demo['eta']}"]
    result = run_tool([*tool_command(cache_demo, out)[:1], str(PROJECT_ROOT / "tools" / "cache_teacher.py"),
                       "--config", str(PROJECT_ROOT / "configs" / "tests" / "tiny_dskd_eta.yaml"), "--out", str(out),
                       "--num-shards", "3", *overrides])
    check(result)
    reference = tmp_path / "reference"
    write_cache(cache_demo, reference, num_shards=3, batch_size=8)
    assert shard_bytes(out) == shard_bytes(reference)
    assert _manifest(out)["tool_args"]["config"].endswith("tiny_dskd_eta.yaml")


def test_a_non_finite_teacher_state_stops_the_write(cache_demo, tmp_path):
    """A NaN in the teacher's output is an error naming the example, never a cached row."""
    import torch
    from transformers import AutoModelForCausalLM

    from dskd_scale.teacher_cache.writer import CacheWriteError

    model = AutoModelForCausalLM.from_pretrained(cache_demo["teacher"], dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "broken_teacher")
    out = tmp_path / "cache"
    with pytest.raises(CacheWriteError, match=r"not finite for example_index \d+"):
        write_cache({**cache_demo, "teacher": tmp_path / "broken_teacher"}, out, num_shards=2)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("hidden-*.bin")) and not list(out.rglob(".*.tmp-*"))
