"""Offline prealignment: instruction JSON-lines -> prealigned Parquet shards + manifest (Contract 1).

``run_prealign(config)`` is the library entry point behind ``tools/prealign.py``. Work is split into
``num_shards`` contiguous ranges of example indices; MPI rank ``r`` of ``W`` builds shards ``r, r+W, ...``
and each shard is built over ``workers`` local processes in ordered chunks, so the bytes of every file depend
only on the inputs and the settings, never on the number of ranks or workers. Rank 0 writes the vocabulary
map, the report and, last, ``manifest.json``.

Resume: a shard whose record names the current plan (tokenizer fingerprints, source checksums, settings)
and whose checksum matches is skipped; anything else, including a half-written shard, is rebuilt.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dskd_scale.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    canonical_json_bytes,
    save_vocab_map,
    tokenizer_record,
    write_manifest,
)
from dskd_scale.data.prealign_dist import ProcessGroup, SingleProcess
from dskd_scale.data.prealign_report import REPORT_FILE, render_report, write_report
from dskd_scale.data.prealign_shards import (
    read_complete_record,
    remove_extra_shards,
    remove_leftovers,
    rows_to_table,
    shard_range,
    write_shard,
    write_shard_record,
)
from dskd_scale.data.prealign_sources import PrealignInputError, SourceFile, read_examples, scan_sources
from dskd_scale.data.prealign_stats import ShardAccumulator, merge_shard_stats
from dskd_scale.utils.logging import get_logger, progress

# Bump when the row-building logic changes, so resume never mixes shards built by different code.
ROW_BUILDER_VERSION = 1

log = get_logger(__name__)


class PrealignError(RuntimeError):
    """Prealignment failed on some rank (the message names the rank and the cause)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrealignConfig:
    """Settings of one prealignment run (``tools/prealign.py`` flags of the same names)."""

    teacher_tokenizer: str
    student_tokenizer: str
    data: tuple[str, ...]
    out: str
    prompt_field: str = "prompt"
    response_field: str = "output"
    max_length: int = 512
    num_shards: int = 1
    skip_bad_rows: bool = False
    workers: int = 1
    chunk_examples: int = 64
    report_examples: int = 5

    def validate(self) -> list[str]:
        problems = []
        if not self.data:
            problems.append("data: give at least one JSON-lines file")
        if self.max_length < 4:
            problems.append(f"max_length must be >= 4, got {self.max_length}")
        if self.num_shards < 1:
            problems.append(f"num_shards must be >= 1, got {self.num_shards}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.chunk_examples < 1:
            problems.append(f"chunk_examples must be >= 1, got {self.chunk_examples}")
        if self.prompt_field == self.response_field:
            problems.append(f"prompt_field and response_field are both {self.prompt_field!r}")
        return problems


def load_tokenizer(path: str, role: str) -> Any:
    """Load a fast tokenizer offline; every failure names the flag and the folder."""
    from transformers import AutoTokenizer

    from dskd_scale.alignment import require_fast_tokenizer

    if not Path(path).is_dir():
        raise PrealignInputError(f"--{role}-tokenizer {path}: not a directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:  # transformers raises many unrelated types for unreadable folders
        raise PrealignInputError(f"--{role}-tokenizer {path}: cannot load a tokenizer ({error})") from error
    try:
        require_fast_tokenizer(tokenizer, f"--{role}-tokenizer {path}")
    except (TypeError, ValueError) as error:
        raise PrealignInputError(str(error)) from error
    if tokenizer.eos_token_id is None:
        raise PrealignInputError(f"--{role}-tokenizer {path}: has no eos_token; set it in tokenizer_config.json")
    return tokenizer


# ---- worker side (runs in the pool processes, or in-process with workers=1) ----------------------------------

_worker_state: dict[str, Any] = {}


def _init_worker(teacher_path: str, student_path: str, max_length: int, report_examples: int) -> None:
    from dskd_scale.data.prealign_rows import RowBuilder

    teacher = load_tokenizer(teacher_path, "teacher")
    student = load_tokenizer(student_path, "student")
    _worker_state["builder"] = RowBuilder(teacher, student, max_length)
    _worker_state["report_examples"] = report_examples


def _build_chunk(chunk: list[tuple[int, str, str, str]]) -> ShardAccumulator:
    """Rows and statistics of a chunk of (example_index, prompt, response, location), in order."""
    accumulator = ShardAccumulator(_worker_state["report_examples"])
    builder = _worker_state["builder"]
    try:
        results = builder.build_many([(prompt, response) for _, prompt, response, _ in chunk])
    except ValueError:
        # Find the offending row, so the error names its file:line.
        for _, prompt, response, location in chunk:
            try:
                builder.build(prompt, response)
            except ValueError as error:
                raise PrealignInputError(f"{location}: {error}") from error
        raise
    for (example_index, _, _, location), result in zip(chunk, results, strict=True):
        accumulator.add(example_index, location, result)
    return accumulator


# ---- driver ---------------------------------------------------------------------------------------------------


def _plan_key(config: PrealignConfig, records: dict[str, dict], sources: list[SourceFile]) -> str:
    plan = {
        "format_version": FORMAT_VERSION,
        "row_builder_version": ROW_BUILDER_VERSION,
        "teacher": records["teacher"]["fingerprint"],
        "student": records["student"]["fingerprint"],
        "sources": [source.as_manifest() for source in sources],
        "fields": [config.prompt_field, config.response_field],
        "max_length": config.max_length,
        "num_shards": config.num_shards,
        "skip_bad_rows": config.skip_bad_rows,
    }
    return hashlib.sha256(canonical_json_bytes(plan)).hexdigest()


def _worker_pool(config: PrealignConfig, init_args: tuple, under_mpi: bool):
    """A pool of ``config.workers`` processes holding a RowBuilder each.

    Without MPI, fork (where available): the children inherit the tokenizers already loaded here, so a pool
    costs no imports (the Rust tokenizers disable their own thread pool in forked children). Under MPI, spawn:
    forking an MPI process is unsafe with some fabrics.
    """
    if not under_mpi and "fork" in multiprocessing.get_all_start_methods():
        _init_worker(*init_args)
        return multiprocessing.get_context("fork").Pool(config.workers)
    return multiprocessing.get_context("spawn").Pool(config.workers, _init_worker, init_args)


def _build_shards(config: PrealignConfig, out_dir: Path, todo: list[int], sources: list[SourceFile], plan: str,
                  num_examples: int, rank: int, under_mpi: bool) -> None:
    ranges = [shard_range(shard, config.num_shards, num_examples) for shard in todo]
    examples, drops = read_examples(sources, ranges, prompt_field=config.prompt_field,
                                    response_field=config.response_field, skip_bad_rows=config.skip_bad_rows)
    init_args = (config.teacher_tokenizer, config.student_tokenizer, config.max_length, config.report_examples)
    pool = None
    if config.workers > 1:
        pool = _worker_pool(config, init_args, under_mpi)
    else:
        _init_worker(*init_args)
    try:
        for shard, (start, stop) in zip(todo, ranges, strict=True):
            remove_leftovers(out_dir, shard)
            wanted = [examples[i] for i in range(start, stop) if i in examples]
            chunks = [
                [(e.example_index, e.prompt, e.response, e.location) for e in wanted[i:i + config.chunk_examples]]
                for i in range(0, len(wanted), config.chunk_examples)
            ]
            results = pool.imap(_build_chunk, chunks) if pool else map(_build_chunk, chunks)
            shard_accumulator = ShardAccumulator(config.report_examples)
            for chunk_result in progress(results, total=len(chunks), desc=f"shard {shard}", unit="chunk"):
                shard_accumulator.merge(chunk_result)
            shard_accumulator.count_drops({i: reason for i, reason in drops.items() if start <= i < stop})
            shard_accumulator.source_rows = stop - start
            table = rows_to_table(shard_accumulator.rows, shard_accumulator.example_indices)
            file_name, sha256 = write_shard(out_dir, shard, table)
            write_shard_record(out_dir, shard, {
                "plan": plan, "shard": shard, "file": file_name, "sha256": sha256, "rows": table.num_rows,
                "example_range": [start, stop], **shard_accumulator.record(),
            })
            log.info("rank %d wrote %s (%d rows)", rank, file_name, table.num_rows)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def _write_outputs(config: PrealignConfig, out_dir: Path, tokenizers: dict[str, Any], records: dict[str, dict],
                   sources: list[SourceFile], plan: str, num_examples: int) -> dict[str, Any]:
    """Rank 0, after every shard exists: vocabulary map, report, then the manifest."""
    from dskd_scale.alignment import build_vocab_map

    shard_records = []
    for shard in range(config.num_shards):
        record = read_complete_record(out_dir, shard, plan)
        if record is None:
            raise PrealignError(f"shard {shard} is missing or incomplete after all ranks finished")
        shard_records.append(record)
    vocab_map = build_vocab_map(tokenizers["teacher"], tokenizers["student"])
    arrays = {key: getattr(vocab_map, key) for key in
              ("teacher_to_student", "student_to_teacher", "overlap_teacher_ids", "overlap_student_ids")}
    vocab_entry = save_vocab_map(out_dir, arrays)
    stats, worst = merge_shard_stats(shard_records, arrays, config.report_examples)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": f"dskd_scale.data.prealign (row builder v{ROW_BUILDER_VERSION})",
        "teacher_tokenizer": records["teacher"],
        "student_tokenizer": records["student"],
        "sources": [source.as_manifest() for source in sources],
        "fields": {"prompt": config.prompt_field, "response": config.response_field,
                   "response_list": "a list-valued response trains on its first element"},
        "max_length": config.max_length,
        "truncation": _truncation_entry(),
        "skip_bad_rows": config.skip_bad_rows,
        "num_examples_in_sources": num_examples,
        "plan": plan,
        "shards": [{"file": r["file"], "rows": r["rows"], "sha256": r["sha256"]} for r in shard_records],
        "vocab_map": vocab_entry,
        "stats": stats,
    }
    write_report(out_dir, manifest, worst)
    write_manifest(out_dir, manifest)
    return manifest


def _truncation_entry() -> dict[str, str]:
    from dskd_scale.data.prealign_rows import TRUNCATION_POLICY

    return {"side": "left (prompt first)", "policy": TRUNCATION_POLICY}


def run_prealign(config: PrealignConfig, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Build (or resume) a prealigned output folder; returns the manifest (on every rank).

    Raises:
        PrealignInputError: bad data (naming file:line), unreadable tokenizer, invalid settings.
        PrealignError: another rank failed (its message is included).
    """
    group = group or SingleProcess()
    problems = config.validate()
    if problems:
        raise PrealignInputError("invalid prealign settings: " + "; ".join(problems))
    out_dir = Path(config.out)
    error: str | None = None
    try:
        tokenizers = {"teacher": load_tokenizer(config.teacher_tokenizer, "teacher"),
                      "student": load_tokenizer(config.student_tokenizer, "student")}
        records = {role: tokenizer_record(tok) for role, tok in tokenizers.items()}
        sources = scan_sources(config.data)
        num_examples = sum(source.rows for source in sources)
        plan = _plan_key(config, records, sources)
        out_dir.mkdir(parents=True, exist_ok=True)
        if group.rank == 0:
            # A manifest describes finished output only: remove it before any shard changes.
            (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
            (out_dir / REPORT_FILE).unlink(missing_ok=True)
            remove_extra_shards(out_dir, config.num_shards)
        mine = range(group.rank, config.num_shards, group.size)
        todo = [shard for shard in mine if read_complete_record(out_dir, shard, plan) is None]
        if len(todo) < len(mine):
            log.info("rank %d: %d of its %d shards are complete and checksum-valid; skipping them",
                     group.rank, len(mine) - len(todo), len(mine))
        if todo:
            _build_shards(config, out_dir, todo, sources, plan, num_examples, group.rank, group.size > 1)
    except Exception as failure:  # every rank must reach the allgather below, or the others wait forever
        error = f"rank {group.rank}: {failure}"
        local_failure: Exception | None = failure
    else:
        local_failure = None
    errors = [e for e in group.allgather(error) if e is not None]
    if local_failure is not None:
        raise local_failure
    if errors:
        raise PrealignError("prealignment failed on another rank: " + "; ".join(errors))

    manifest_error: str | None = None
    manifest: dict[str, Any] | None = None
    if group.rank == 0:
        try:
            manifest = _write_outputs(config, out_dir, tokenizers, records, sources, plan, num_examples)
            print(render_report(manifest, out_dir), flush=True)
        except Exception as failure:
            manifest_error = f"rank 0: {failure}"
            local_failure = failure
    outcome = group.allgather(manifest_error)
    if local_failure is not None:
        raise local_failure
    if outcome[0] is not None:
        raise PrealignError("writing the manifest failed: " + outcome[0])
    if manifest is None:
        from dskd_scale.data.format import read_manifest

        manifest = read_manifest(out_dir)
    return manifest

