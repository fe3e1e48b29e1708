"""Write a teacher hidden-state cache: one frozen-teacher pass over a prealigned folder (``tools/cache_teacher.py``).

Work is split into ``num_shards`` contiguous ranges of the prealigned folder's rows; rank ``r`` of ``W`` writes
shards ``r, r+W, ...`` with a plain Hugging Face model on its own device (bf16 on GPU, fp32 on CPU). Inside a
shard, examples are taken in windows of ``SORT_WINDOW`` rows, each window's examples sorted by teacher length
(longest first) into batches of ``batch_size``, so the padding is small and every row's bytes depend only on the
shard, the settings and the device, never on the number of ranks. Rows are streamed to disk window by window
in example order (memory is one window, whatever the shard size).

Crash safety and resume follow prealignment (``dskd_scale.prealign.shards``): every file goes to a temporary
name, is fsynced and renamed; a shard's record (``records/shard-KKKKK.json``) is written last and names the plan
(teacher and data fingerprints, mode, dtype, shard count, batch size, forward precision); a rerun keeps the
shards whose record names the current plan and whose checksums still match and rebuilds the rest. Rank 0
removes ``manifest.json`` when a run starts and writes it when every rank finished, so a half-written cache is
never read (``TeacherCache.open`` requires the manifest).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd_scale.config.run import ModelConfig
from dskd_scale.data.format import (
    MANIFEST_FILE,
    atomic_write_bytes,
    canonical_json_bytes,
    file_sha256,
    fsync_directory,
    remove_stale_temporaries,
    temporary_path,
    write_manifest,
)
from dskd_scale.prealign.process_group import ProcessGroup, SingleProcess, raise_if_any_failed
from dskd_scale.prealign.shards import read_complete_record, shard_range
from dskd_scale.teacher_cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    DIGEST_BYTES,
    DTYPES,
    MODES,
    RECORD_DIR,
    CacheMismatch,
    bytes_per_row,
    cached_positions,
    configured_teacher_fingerprint,
    data_fingerprint,
    encode_rows,
    hidden_file_name,
    index_file_name,
    record_path,
    teacher_ids_digest,
    text_fingerprint,
)
from dskd_scale.utils.logging import get_logger, progress_counter

log = get_logger(__name__)
SORT_WINDOW = 1024
FORWARD_PRECISIONS = ("auto", "fp32", "bf16")


class CacheInputError(ValueError):
    """Bad settings or input folders of a cache write (the message names the flag or config key)."""


class CacheWriteError(RuntimeError):
    """Writing the cache failed on some rank (the message names the rank and the cause)."""


@dataclass(frozen=True, kw_only=True)
class CacheWriteConfig:
    """Settings of one cache write (``tools/cache_teacher.py`` flags of the same names)."""

    teacher: ModelConfig  # a model folder (``path``) or a random build (``architecture``), plus its tokenizer
    data_dir: str  # the prealigned folder (a run's data.train_dir)
    out: str
    mode: str = "aligned"
    dtype: str = "bf16"
    batch_size: int = 8
    num_shards: int = 64
    precision: str = "auto"  # forward precision: auto = bf16 on GPU, fp32 on CPU
    tool_args: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest

    def problems(self) -> list[str]:
        problems = []
        if self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.precision not in FORWARD_PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(FORWARD_PRECISIONS)}, got {self.precision!r}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.num_shards < 1:
            problems.append(f"--num-shards must be >= 1, got {self.num_shards}")
        if not self.data_dir:
            problems.append("no prealigned folder: give --data DIR or --config with data.train_dir")
        elif not (Path(self.data_dir) / MANIFEST_FILE).is_file():
            problems.append(f"data.train_dir / --data {self.data_dir}: no {MANIFEST_FILE}; expected a "
                            "tools/prealign.py output folder")
        if not self.out:
            problems.append("--out is required")
        problems += self.teacher.problems("teacher")
        return problems


class TorchGroup:
    """``torch.distributed`` over gloo for ranks started by torchrun or the deepspeed launcher (RANK/WORLD_SIZE);
    only small Python objects travel."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        if not dist.is_initialized():
            # A rank may wait here for the slowest rank's shards: allow a long pass (the default is 30 minutes).
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def allgather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.size
        self._dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        self._dist.barrier()


def detect_group() -> ProcessGroup:
    """torch.distributed under torchrun/deepspeed (WORLD_SIZE > 1), else MPI under mpiexec/srun, else one
    process (``dskd_scale.prealign.process_group``)."""
    from dskd_scale.prealign.process_group import detect_process_group

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ:
        return TorchGroup()
    return detect_process_group()


def _local_rank() -> int:
    for variable in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def forward_device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    """This rank's GPU (by local rank) in bf16, or the CPU in fp32 (``precision`` may force either dtype)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", _local_rank() % torch.cuda.device_count())
        return device, torch.float32 if precision == "fp32" else torch.bfloat16
    return torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32


# ---- plan, records --------------------------------------------------------------------------------------------


def _plan_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json_bytes(identity)).hexdigest()


def _read_complete_record(out_dir: Path, shard: int, plan: str) -> dict[str, Any] | None:
    """The shard's record if it names ``plan`` and both shard files still match their checksums, else None."""
    return read_complete_record(out_dir, shard, plan, record_file=record_path(out_dir, shard),
                                file_keys=(("index_file", "index_sha256"), ("hidden_file", "hidden_sha256")))


def _shard_files(out_dir: Path, shard: int) -> list[Path]:
    return [out_dir / hidden_file_name(shard), out_dir / index_file_name(shard), record_path(out_dir, shard)]


def _remove_leftovers(out_dir: Path, shard: int) -> None:
    for path in _shard_files(out_dir, shard):
        remove_stale_temporaries(path)


def _remove_extra_shards(out_dir: Path, num_shards: int) -> None:
    """Delete the files of shards numbered >= ``num_shards`` (an earlier run with more shards)."""
    numbers = set()
    for pattern in ("hidden-*.bin", "index-*.safetensors", f"{RECORD_DIR}/shard-*.json", ".hidden-*.tmp-*",
                    ".index-*.tmp-*", f"{RECORD_DIR}/.shard-*.tmp-*"):
        for path in out_dir.glob(pattern):
            digits = path.name.lstrip(".").split("-", 1)[1][:5]
            if digits.isdigit():
                numbers.add(int(digits))
    for number in sorted(n for n in numbers if n >= num_shards):
        for path in _shard_files(out_dir, number):
            path.unlink(missing_ok=True)
        _remove_leftovers(out_dir, number)


# ---- one shard ------------------------------------------------------------------------------------------------


class _HiddenStream:
    """The shard's hidden file, written sequentially under a temporary name with a running sha256."""

    def __init__(self, final: Path):
        self.final = final
        self.temporary = temporary_path(final)
        self.handle = open(self.temporary, "wb")
        self.digest = hashlib.sha256()

    def write(self, stored: np.ndarray) -> None:
        data = np.ascontiguousarray(stored).tobytes()
        self.handle.write(data)
        self.digest.update(data)

    def commit(self) -> str:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.temporary, self.final)
        fsync_directory(self.final.parent)
        return self.digest.hexdigest()

    def abort(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.temporary.unlink(missing_ok=True)


def _window_rows(body, dataset, rows: range, config: CacheWriteConfig, pad_id: int, device: torch.device
                 ) -> list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per example of ``rows`` (in order): (example, positions [R], stored [R, E], scales [R] | None)."""
    examples = [dataset[i] for i in rows]
    positions = [cached_positions(example, config.mode) for example in examples]
    lengths = np.array([example["teacher_input_ids"].size for example in examples], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    results: list[Any] = [None] * len(examples)
    for first in range(0, order.size, config.batch_size):
        members = order[first:first + config.batch_size]
        width = int(lengths[members].max())
        input_ids = torch.full((members.size, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((members.size, width), dtype=torch.long)
        for slot, member in enumerate(members):
            ids = torch.from_numpy(examples[member]["teacher_input_ids"].astype(np.int64))
            input_ids[slot, :ids.numel()] = ids
            attention_mask[slot, :ids.numel()] = 1
        with torch.inference_mode():
            hidden_BTE = body(input_ids.to(device), attention_mask.to(device))
        slots = np.repeat(np.arange(members.size), [positions[m].size for m in members])
        wanted = np.concatenate([positions[m] for m in members]) if members.size else np.zeros(0, np.int64)
        picked = hidden_BTE[torch.from_numpy(slots).to(device), torch.from_numpy(wanted).to(device)]
        finite = torch.isfinite(picked).all(dim=1).cpu().numpy()
        if not finite.all():  # a cache must never hand training a NaN/inf the live teacher would have flagged
            bad = int(examples[members[slots[int(np.flatnonzero(~finite)[0])]]]["example_index"])
            raise CacheWriteError(f"the teacher's hidden state is not finite for example_index {bad} (forward "
                                  f"dtype {next(body.parameters()).dtype}); try --precision fp32")
        stored, scales = encode_rows(picked, config.dtype)
        bounds = np.concatenate([[0], np.cumsum([positions[m].size for m in members])])
        for slot, member in enumerate(members):
            start, stop = bounds[slot], bounds[slot + 1]
            results[member] = (examples[member], positions[member], stored[start:stop],
                               None if scales is None else scales[start:stop])
    return results


def _write_shard(out_dir: Path, shard: int, rows: range, body, dataset, config: CacheWriteConfig, pad_id: int,
                 device: torch.device, plan: str, counter) -> dict[str, Any]:
    from safetensors.numpy import save

    stream = _HiddenStream(out_dir / hidden_file_name(shard))
    example_index, row_counts, digests, positions, scales = [], [], [], [], []
    teacher_tokens = 0
    try:
        for start in range(rows.start, rows.stop, SORT_WINDOW):
            window = range(start, min(start + SORT_WINDOW, rows.stop))
            for example, kept, stored, row_scales in _window_rows(body, dataset, window, config, pad_id, device):
                stream.write(stored)
                example_index.append(int(example["example_index"]))
                teacher_tokens += int(example["teacher_input_ids"].size)
                row_counts.append(kept.size)
                digests.append(teacher_ids_digest(example["teacher_input_ids"]))
                positions.append(kept.astype(np.int32))
                if row_scales is not None:
                    scales.append(row_scales)
            counter.update(len(window))
        hidden_sha256 = stream.commit()
    except BaseException:
        stream.abort()
        raise
    offsets = np.zeros(len(row_counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(row_counts, dtype=np.int64), out=offsets[1:])
    index = {
        "example_index": np.asarray(example_index, dtype=np.int64),
        "row_offsets": offsets,
        "teacher_ids_digest": (np.stack(digests) if digests else np.zeros((0, DIGEST_BYTES), np.uint8)),
        "positions": np.concatenate(positions) if positions else np.zeros(0, np.int32),
    }
    if config.dtype == "fp8_e4m3":
        index["scales"] = np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32)
    index_path = out_dir / index_file_name(shard)
    atomic_write_bytes(index_path, save(index))
    record = {"plan": plan, "shard": shard, "example_range": [rows.start, rows.stop], "examples": len(row_counts),
              "rows": int(offsets[-1]), "teacher_tokens": teacher_tokens,
              "hidden_file": hidden_file_name(shard), "hidden_sha256": hidden_sha256,
              "index_file": index_file_name(shard), "index_sha256": file_sha256(index_path)}
    record_path(out_dir, shard).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(record_path(out_dir, shard), canonical_json_bytes(record))
    return record


# ---- driver ---------------------------------------------------------------------------------------------------


def _teacher_identity(teacher: ModelConfig, tokenizer) -> tuple[str, Any]:
    """(fingerprint, transformers config) of the configured teacher: a model folder or a random build."""
    try:
        fingerprint = configured_teacher_fingerprint(teacher, tokenizer)
    except CacheMismatch as error:
        raise CacheInputError(f"--teacher / {error}") from error
    if teacher.architecture:
        from dskd_scale.models.build import random_model_config

        return fingerprint, random_model_config(teacher, tokenizer)
    from transformers import AutoConfig

    return fingerprint, AutoConfig.from_pretrained(teacher.path)


def _open_data(config: CacheWriteConfig, tokenizer):
    from dskd_scale.data.dataset import DataError, PrealignedDataset
    from dskd_scale.data.format import tokenizer_fingerprint

    try:
        return PrealignedDataset.open(config.data_dir, expected_teacher_fingerprint=tokenizer_fingerprint(tokenizer),
                                      expected_student_fingerprint=None)
    except DataError as error:
        raise CacheInputError(f"data.train_dir / --data {config.data_dir}: {error}") from error


def run_cache_teacher(config: CacheWriteConfig, group: ProcessGroup | None = None) -> dict[str, Any]:
    """Write (or finish) the cache ``config.out``; returns its manifest (on every rank).

    Raises:
        CacheInputError: bad settings, an unreadable teacher or prealigned folder (naming the flag or key).
        CacheWriteError: another rank failed (its message is included).
    """
    from dskd_scale.models.build import ModelBuildError, build_causal_lm, load_tokenizer
    from dskd_scale.models.wrappers import TeacherBody

    group = group or SingleProcess()
    problems = config.problems()
    if problems:
        raise CacheInputError("invalid cache_teacher settings: " + "; ".join(problems))
    out_dir = Path(config.out)
    error: str | None = None
    local_failure: BaseException | None = None
    try:
        try:
            tokenizer = load_tokenizer(config.teacher.tokenizer_path, key="teacher.tokenizer")
        except ModelBuildError as failure:
            raise CacheInputError(str(failure)) from failure
        dataset = _open_data(config, tokenizer)
        fingerprint, model_config = _teacher_identity(config.teacher, tokenizer)
        device, dtype = forward_device_and_dtype(config.precision)
        num_shards = max(1, min(config.num_shards, len(dataset)))
        identity = {"format_version": CACHE_VERSION, "teacher_fingerprint": fingerprint,
                    "data_fingerprint": data_fingerprint(config.data_dir), "mode": config.mode, "dtype": config.dtype,
                    "num_shards": num_shards, "batch_size": config.batch_size, "forward_dtype": str(dtype),
                    "sort_window": SORT_WINDOW}
        plan = _plan_key(identity)
        out_dir.mkdir(parents=True, exist_ok=True)
        if group.rank == 0:  # the manifest describes finished output only: remove it before any shard changes
            (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
            remove_stale_temporaries(out_dir / MANIFEST_FILE)
            _remove_extra_shards(out_dir, num_shards)
    except Exception as failure:  # every rank must reach the allgather below, or the others wait forever
        error, local_failure = f"rank {group.rank}: {failure}", failure
    _raise_if_any_failed(group, error, local_failure)

    error = None
    try:
        mine = range(group.rank, num_shards, group.size)
        for shard in mine:
            _remove_leftovers(out_dir, shard)
        todo = [shard for shard in mine if _read_complete_record(out_dir, shard, plan) is None]
        if len(todo) < len(mine):
            log.info("rank %d: %d of its %d shards are complete and checksum-valid; skipping them",
                     group.rank, len(mine) - len(todo), len(mine))
        if todo:
            teacher = build_causal_lm(config.teacher, tokenizer, dtype=dtype, key="teacher", device=device)
            body = TeacherBody(teacher).eval().requires_grad_(False)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            ranges = {shard: range(*shard_range(shard, num_shards, len(dataset))) for shard in todo}
            counter = progress_counter(sum(len(r) for r in ranges.values()), unit="examples",
                                       desc=f"cache_teacher: {len(todo)} shard(s) of rank {group.rank}")
            try:
                for shard in todo:
                    record = _write_shard(out_dir, shard, ranges[shard], body, dataset, config, pad_id, device, plan,
                                          counter)
                    log.info("rank %d wrote shard %d (%d examples, %d rows)", group.rank, shard, record["examples"],
                             record["rows"])
            finally:
                counter.close()
    except Exception as failure:
        error, local_failure = f"rank {group.rank}: {failure}", failure
    _raise_if_any_failed(group, error, local_failure)

    error = None
    manifest: dict[str, Any] | None = None
    if group.rank == 0:
        try:
            manifest = _write_manifest(out_dir, config, identity, plan, num_shards, dataset, model_config)
        except Exception as failure:
            error, local_failure = f"rank 0: {failure}", failure
    _raise_if_any_failed(group, error, local_failure)
    if manifest is None:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    return manifest


def _raise_if_any_failed(group: ProcessGroup, error: str | None, local_failure: BaseException | None) -> None:
    raise_if_any_failed(group, error, local_failure, CacheWriteError, "writing the teacher cache")


def _hidden_size(model_config) -> int:
    return int(getattr(model_config, "hidden_size", None) or model_config.n_embd)


def _write_manifest(out_dir: Path, config: CacheWriteConfig, identity: dict[str, Any], plan: str, num_shards: int,
                    dataset, model_config) -> dict[str, Any]:
    """Rank 0, after every rank finished: check every shard's record, then write ``manifest.json`` last."""
    records = []
    for shard in range(num_shards):
        record = _read_complete_record(out_dir, shard, plan)
        if record is None:
            raise CacheWriteError(f"shard {shard} is missing or incomplete after all ranks finished")
        records.append(record)
    hidden_size = _hidden_size(model_config)
    rows = sum(r["rows"] for r in records)
    teacher_tokens = sum(r["teacher_tokens"] for r in records)
    files_bytes = sum((out_dir / r[f"{key}_file"]).stat().st_size for r in records for key in ("index", "hidden"))
    manifest = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_VERSION,
        "created_by": "tools/cache_teacher.py",
        "teacher_fingerprint": identity["teacher_fingerprint"],
        "teacher": {"path": config.teacher.path, "architecture": config.teacher.architecture,
                    "tokenizer": config.teacher.tokenizer_path, "model_type": getattr(model_config, "model_type", "")},
        "data_fingerprint": identity["data_fingerprint"],
        "text_fingerprint": text_fingerprint(config.data_dir),
        "data_dir": str(config.data_dir),
        "mode": config.mode,
        "dtype": config.dtype,
        "hidden_size": hidden_size,
        "forward_dtype": identity["forward_dtype"],
        "batch_size": config.batch_size,
        "num_examples": sum(r["examples"] for r in records),
        "num_rows": rows,
        "teacher_tokens": teacher_tokens,
        "bytes_per_token": {
            "written": config.dtype,
            # per cached row (= per cached teacher token): values + position (+ fp8 scale)
            **{dtype: bytes_per_row(dtype, hidden_size) for dtype in DTYPES},
            "on_disk": files_bytes / rows if rows else 0.0,  # all shard files (index included) / rows
        },
        "plan": plan,
        "shards": [{"shard": r["shard"], "examples": r["examples"], "rows": r["rows"],
                    "example_range": r["example_range"], "hidden_file": r["hidden_file"],
                    "hidden_sha256": r["hidden_sha256"], "index_file": r["index_file"],
                    "index_sha256": r["index_sha256"]} for r in records],
        "tool_args": config.tool_args,
    }
    write_manifest(out_dir, manifest)
    return manifest
