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

from dskd_scale.alignment.eta import WHITESPACE_MODES
from dskd_scale.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    VOCAB_MAP_FILE,
    canonical_json_bytes,
    remove_stale_temporaries,
    save_vocab_map,
    tokenizer_record,
    write_manifest,
)
from dskd_scale.prealign.batch_rows import build_rows
from dskd_scale.prealign.process_group import ProcessGroup, SingleProcess, raise_if_any_failed
from dskd_scale.prealign.prompts import (
    CHAT_TEMPLATE_SOURCES,
    PromptFormat,
    PromptFormatError,
    RowRenderer,
    chat_renderer,
)
from dskd_scale.prealign.report import HISTOGRAM_FILE, REPORT_FILE, render_report, unused_fields_message, write_report
from dskd_scale.prealign.rows import TRUNCATION_POLICY, RowBuilder
from dskd_scale.prealign.shards import (
    read_complete_record,
    remove_extra_shards,
    remove_leftovers,
    rows_to_table,
    shard_range,
    write_shard,
    write_shard_record,
)
from dskd_scale.prealign.sources import PrealignInputError, SourceFile, read_examples, scan_sources
from dskd_scale.prealign.stats import ShardAccumulator, merge_shard_stats
from dskd_scale.utils.hub import load_pretrained
from dskd_scale.utils.logging import get_logger, progress_counter

# Bump when the row-building logic or the shard records change, so resume never mixes shards built by different
# code (v2: records hold the per-example coverage histogram; v3: byte-span alignment, whitespace modes).
ROW_BUILDER_VERSION = 3

log = get_logger(__name__)
# Written by rank 0 after every shard exists; removed (with any temporary file of a killed run) when a run starts.
RANK_ZERO_FILES = (MANIFEST_FILE, REPORT_FILE, HISTOGRAM_FILE, VOCAB_MAP_FILE)


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
    template: str | None = None
    chat_template: str | None = None
    messages_field: str = "messages"
    ignore_fields: tuple[str, ...] = ()
    max_length: int = 512
    num_shards: int = 1
    skip_bad_rows: bool = False
    workers: int = 1
    chunk_examples: int = 64
    report_examples: int = 5
    whitespace: str = "exact"

    def validate(self) -> list[str]:
        problems = []
        if not self.data:
            problems.append("data: give at least one data file, save_to_disk folder or hf:NAME")
        if self.max_length < 4:
            problems.append(f"max_length must be >= 4, got {self.max_length}")
        if self.num_shards < 1:
            problems.append(f"num_shards must be >= 1, got {self.num_shards}")
        if self.workers < 1:
            problems.append(f"workers must be >= 1, got {self.workers}")
        if self.chunk_examples < 1:
            problems.append(f"chunk_examples must be >= 1, got {self.chunk_examples}")
        if self.whitespace not in WHITESPACE_MODES:
            problems.append(f"whitespace must be one of {', '.join(WHITESPACE_MODES)}, got {self.whitespace!r}")
        return problems + self.prompt_format.problems()

    @property
    def prompt_format(self) -> PromptFormat:
        return PromptFormat(prompt_field=self.prompt_field, response_field=self.response_field,
                            template=self.template, chat_template=self.chat_template,
                            messages_field=self.messages_field, ignore_fields=tuple(self.ignore_fields))


def load_tokenizer(path: str, role: str) -> Any:
    """Load a fast tokenizer from a folder or a Hub id; every failure names the flag and the folder or id."""
    from transformers import AutoTokenizer

    from dskd_scale.alignment import require_fast_tokenizer

    if Path(path).exists() and not Path(path).is_dir():
        raise PrealignInputError(f"--{role}-tokenizer {path}: not a directory")
    try:
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, path, key=f"--{role}-tokenizer",
                                    what="tokenizer", error_type=PrealignInputError)
    except PrealignInputError:
        raise
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


def _init_worker(teacher_path: str, student_path: str, max_length: int, report_examples: int,
                 whitespace: str) -> None:
    teacher = load_tokenizer(teacher_path, "teacher")
    student = load_tokenizer(student_path, "student")
    _worker_state["builder"] = RowBuilder(teacher, student, max_length, whitespace)
    _worker_state["report_examples"] = report_examples


def _build_chunk(chunk: list[tuple[int, str, str, str]]) -> ShardAccumulator:
    """Rows and statistics of a chunk of (example_index, prompt, response, location), in order."""
    accumulator = ShardAccumulator(_worker_state["report_examples"])
    builder = _worker_state["builder"]
    try:
        results = build_rows(builder, [(prompt, response) for _, prompt, response, _ in chunk])
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


def _plan_key(config: PrealignConfig, records: dict[str, dict], sources: list[SourceFile],
              tokenizers: dict[str, Any]) -> str:
    plan = {
        "format_version": FORMAT_VERSION,
        "row_builder_version": ROW_BUILDER_VERSION,
        "teacher": records["teacher"]["fingerprint"],
        "student": records["student"]["fingerprint"],
        "sources": [source.as_manifest() for source in sources],
        "prompt_format": _prompt_format_entry(config, tokenizers),
        "max_length": config.max_length,
        "num_shards": config.num_shards,
        "skip_bad_rows": config.skip_bad_rows,
        "whitespace": config.whitespace,
    }
    return hashlib.sha256(canonical_json_bytes(plan)).hexdigest()


def _chat_template_text(config: PrealignConfig, tokenizers: dict[str, Any]) -> str | None:
    if config.chat_template is None:
        return None
    if config.chat_template in CHAT_TEMPLATE_SOURCES:
        return getattr(tokenizers[config.chat_template], "chat_template", None)
    return Path(config.chat_template).read_text(encoding="utf-8")


def _prompt_format_entry(config: PrealignConfig, tokenizers: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record of the prompt format; with a chat format, the template's sha256 (a tokenizer's chat
    template lives in tokenizer_config.json, outside the tokenizer fingerprint)."""
    entry = config.prompt_format.manifest_entry()
    if config.chat_template is not None:
        text = _chat_template_text(config, tokenizers) or ""
        entry["chat_template_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return entry


def _renderer(config: PrealignConfig, tokenizers: dict[str, Any]) -> RowRenderer:
    prompt_format = config.prompt_format
    if prompt_format.kind != "chat":
        return RowRenderer(prompt_format)
    # A Jinja file is rendered by the student tokenizer (which supplies bos/eos names to the template).
    side = config.chat_template if config.chat_template in CHAT_TEMPLATE_SOURCES else "student"
    try:
        return RowRenderer(prompt_format, chat_renderer(tokenizers[side], config.chat_template))
    except PromptFormatError as error:
        raise PrealignInputError(str(error)) from error


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
                  num_examples: int, rank: int, under_mpi: bool, renderer: RowRenderer) -> None:
    ranges = [shard_range(shard, config.num_shards, num_examples) for shard in todo]
    examples, drops, unused = read_examples(sources, ranges, renderer=renderer, skip_bad_rows=config.skip_bad_rows)
    init_args = (config.teacher_tokenizer, config.student_tokenizer, config.max_length, config.report_examples,
                 config.whitespace)
    pool = None
    if config.workers > 1:
        pool = _worker_pool(config, init_args, under_mpi)
    else:
        _init_worker(*init_args)
    # One display for all of this rank's work, in examples, so its rate and ETA cover the whole run.
    counter = progress_counter(sum(stop - start for start, stop in ranges), unit="examples",
                               desc=f"prealign: {len(todo)} shard(s) of rank {rank}")
    try:
        for shard, (start, stop) in zip(todo, ranges, strict=True):
            wanted = [examples[i] for i in range(start, stop) if i in examples]
            chunks = [
                [(e.example_index, e.prompt, e.response, e.location) for e in wanted[i:i + config.chunk_examples]]
                for i in range(0, len(wanted), config.chunk_examples)
            ]
            results = pool.imap(_build_chunk, chunks) if pool else map(_build_chunk, chunks)
            shard_accumulator = ShardAccumulator(config.report_examples)
            for chunk, chunk_result in zip(chunks, results, strict=True):
                shard_accumulator.merge(chunk_result)
                counter.update(len(chunk))
            counter.update(stop - start - len(wanted))  # dropped rows are done too
            shard_accumulator.count_drops({i: reason for i, reason in drops.items() if start <= i < stop})
            shard_accumulator.count_unused_fields([fields for i, fields in unused.items() if start <= i < stop])
            shard_accumulator.source_rows = stop - start
            table = rows_to_table(shard_accumulator.rows, shard_accumulator.example_indices)
            file_name, sha256 = write_shard(out_dir, shard, table)
            write_shard_record(out_dir, shard, {
                "plan": plan, "shard": shard, "file": file_name, "sha256": sha256, "rows": table.num_rows,
                "example_range": [start, stop], **shard_accumulator.record(),
            })
            log.info("rank %d wrote %s (%d rows)", rank, file_name, table.num_rows)
    finally:
        counter.close()
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
        "created_by": f"dskd_scale.prealign (row builder v{ROW_BUILDER_VERSION})",
        "teacher_tokenizer": records["teacher"],
        "student_tokenizer": records["student"],
        "sources": [source.as_manifest() for source in sources],
        "prompt_format": _prompt_format_entry(config, tokenizers),
        "max_length": config.max_length,
        "truncation": _truncation_entry(),
        "alignment": {"whitespace": config.whitespace},
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
        renderer = _renderer(config, tokenizers)
        sources = scan_sources(config.data)
        num_examples = sum(source.rows for source in sources)
        plan = _plan_key(config, records, sources, tokenizers)
        out_dir.mkdir(parents=True, exist_ok=True)
        if group.rank == 0:
            # A manifest describes finished output only: remove it before any shard changes.
            for name in RANK_ZERO_FILES:
                (out_dir / name).unlink(missing_ok=True)
                remove_stale_temporaries(out_dir / name)
            remove_extra_shards(out_dir, config.num_shards)
        mine = range(group.rank, config.num_shards, group.size)
        for shard in mine:  # temporary files of a killed run, also next to shards that are complete
            remove_leftovers(out_dir, shard)
        todo = [shard for shard in mine if read_complete_record(out_dir, shard, plan) is None]
        if len(todo) < len(mine):
            log.info("rank %d: %d of its %d shards are complete and checksum-valid; skipping them",
                     group.rank, len(mine) - len(todo), len(mine))
        if todo:
            _build_shards(config, out_dir, todo, sources, plan, num_examples, group.rank, group.size > 1, renderer)
    except Exception as failure:  # every rank must reach the allgather below, or the others wait forever
        error = f"rank {group.rank}: {failure}"
        local_failure: Exception | None = failure
    else:
        local_failure = None
    raise_if_any_failed(group, error, local_failure, PrealignError, "prealignment")

    manifest_error: str | None = None
    manifest: dict[str, Any] | None = None
    if group.rank == 0:
        try:
            manifest = _write_outputs(config, out_dir, tokenizers, records, sources, plan, num_examples)
            print(render_report(manifest, out_dir), flush=True)
            if manifest["stats"]["unused_fields"]:
                log.warning(unused_fields_message(manifest["stats"]["unused_fields"]))
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

