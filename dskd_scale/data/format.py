"""The prealigned shard format (docs/design.md, Contract 1): names, fingerprints, manifest, checksums.

Written by ``tools/prealign.py`` (``dskd_scale.prealign``) and read by the training side, which uses
``read_manifest`` / ``verify_shards`` / ``check_tokenizer`` / ``load_vocab_map`` to refuse unknown format
versions, corrupted shards and tokenizers other than the ones the shards were built with.

Assumptions:
- Tokenizers are HF *fast* tokenizers; the fingerprint hashes the backend ``tokenizer.json`` state (model
  vocabulary and merges, normaliser, pre-tokeniser, post-processor, decoder, added tokens) plus the special
  token ids and ``len(tokenizer)``. Runtime padding/truncation settings are excluded: they change with calls,
  not with the vocabulary.
- Every file of an output folder is written to a temporary name, fsynced and renamed, so a file under its
  final name is always complete; ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "dskd_scale.prealigned"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
VOCAB_MAP_FILE = "vocab_map.safetensors"
SHARD_PATTERN = "shard-{index:05d}.parquet"
VOCAB_MAP_KEYS = ("teacher_to_student", "student_to_teacher", "overlap_teacher_ids", "overlap_student_ids")
IGNORE_INDEX = -100
INT32_LIST_COLUMNS = (
    "student_input_ids",
    "teacher_input_ids",
    "student_labels",
    "teacher_labels",
    "align_student",
    "align_teacher",
)
_REQUIRED_MANIFEST_KEYS = (
    "format",
    "format_version",
    "teacher_tokenizer",
    "student_tokenizer",
    "sources",
    "max_length",
    "truncation",
    "shards",
    "stats",
)
# Runtime state of a backend tokenizer that is not part of its identity.
_VOLATILE_TOKENIZER_KEYS = ("truncation", "padding")


class ShardFormatError(ValueError):
    """A prealigned output folder is missing, corrupted, of another format version or built for other tokenizers."""


def shard_file_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def temporary_path(path: str | os.PathLike) -> Path:
    """The hidden name a file is written under before its atomic rename (one per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``path`` that a killed writer left (``temporary_path`` of any process).

    Call it only where no other process can be writing ``path`` at the same time."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.tmp-*"))
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    return stale


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete, never partial."""
    path = Path(path)
    temporary = temporary_path(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename durable (a no-op where directories cannot be opened, e.g. on Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def canonical_json_bytes(value: Any) -> bytes:
    """Deterministic JSON (sorted keys, fixed separators): the bytes depend only on the value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (hex) identifying what a fast tokenizer does to text.

    Two tokenizers with equal fingerprints produce the same ids and offsets for every text; the training side
    recomputes this from its configured tokenizer and compares it with the manifest.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise TypeError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; prealigned shards need offset mappings")
    state = json.loads(backend.to_str())
    for key in _VOLATILE_TOKENIZER_KEYS:
        state.pop(key, None)
    identity = {
        "backend": state,
        "len": len(tokenizer),
        "special_token_ids": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id,
        },
        "all_special_tokens": sorted(tokenizer.all_special_tokens),
    }
    return hashlib.sha256(canonical_json_bytes(identity)).hexdigest()


def tokenizer_record(tokenizer: Any) -> dict[str, Any]:
    """The manifest's per-tokenizer entry (Contract 1)."""
    return {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "name_or_path": str(tokenizer.name_or_path),
        "len": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomically write ``manifest.json`` (human-readable, deterministic key order as given)."""
    path = Path(directory) / MANIFEST_FILE
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json``: format name, a known ``format_version`` and the required keys.

    Raises:
        ShardFormatError: naming the manifest path and what is wrong with it.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path}: no manifest; is {directory} an output folder of tools/prealign.py?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardFormatError(f"{path}: format is {found!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {manifest.get('format_version')!r} is not supported by this dskd_scale "
            f"(it reads version {FORMAT_VERSION}); re-run tools/prealign.py"
        )
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ShardFormatError(f"{path}: missing keys {missing}")
    return manifest


def verify_shards(directory: str | os.PathLike) -> dict[str, Any]:
    """Check every shard listed in the manifest (and the vocabulary map) against its sha256 and row count.

    Returns:
        The manifest, once every file checks out.

    Raises:
        ShardFormatError: naming the first missing or corrupted file.
    """
    import pyarrow.parquet as pq

    directory = Path(directory)
    manifest = read_manifest(directory)
    vocab_entry = manifest.get("vocab_map")
    if vocab_entry is not None:
        _check_checksum(directory / vocab_entry["file"], vocab_entry["sha256"])
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        _check_checksum(path, shard["sha256"])
        rows = pq.read_metadata(path).num_rows
        if rows != shard["rows"]:
            raise ShardFormatError(f"{path}: holds {rows} rows, the manifest says {shard['rows']}")
    return manifest


def _check_checksum(path: Path, expected_sha256: str) -> None:
    if not path.is_file():
        raise ShardFormatError(f"{path}: listed in {MANIFEST_FILE} but missing")
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise ShardFormatError(
            f"{path}: sha256 {actual} does not match the manifest ({expected_sha256}); the file is corrupted or "
            "was changed after prealignment"
        )


def check_tokenizer(manifest: dict[str, Any], role: str, tokenizer: Any) -> None:
    """Refuse a tokenizer other than the one the shards were built with.

    Args:
        manifest: from ``read_manifest``.
        role: ``"teacher"`` or ``"student"``.
        tokenizer: the tokenizer the training run configured for that role.
    """
    if role not in ("teacher", "student"):
        raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
    recorded = manifest[f"{role}_tokenizer"]
    actual = tokenizer_fingerprint(tokenizer)
    if actual != recorded["fingerprint"]:
        raise ShardFormatError(
            f"the {role} tokenizer {tokenizer.name_or_path!r} (fingerprint {actual[:12]}) is not the one the shards "
            f"were built with ({recorded['name_or_path']!r}, fingerprint {recorded['fingerprint'][:12]}); "
            "re-run tools/prealign.py with this tokenizer or configure the original one"
        )


def save_vocab_map(directory: str | os.PathLike, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Atomically write ``vocab_map.safetensors``; returns its manifest entry ``{file, sha256}``."""
    from safetensors.numpy import save

    missing = [key for key in VOCAB_MAP_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"vocabulary map lacks {missing}")
    tensors = {key: np.ascontiguousarray(arrays[key], dtype=np.int64) for key in VOCAB_MAP_KEYS}
    path = Path(directory) / VOCAB_MAP_FILE
    atomic_write_bytes(path, save(tensors))
    return {"file": VOCAB_MAP_FILE, "sha256": file_sha256(path)}


def load_vocab_map(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The vocabulary map of an output folder as int64 numpy arrays.

    Returns:
        ``teacher_to_student [len(teacher_tokenizer)]`` (−1 where unmapped), ``student_to_teacher
        [len(student_tokenizer)]``, ``overlap_teacher_ids [O]`` and ``overlap_student_ids [O]`` (paired).
    """
    from safetensors.numpy import load_file

    path = Path(directory) / VOCAB_MAP_FILE
    if not path.is_file():
        raise ShardFormatError(f"{path}: missing; is {directory} an output folder of tools/prealign.py?")
    arrays = load_file(str(path))
    missing = [key for key in VOCAB_MAP_KEYS if key not in arrays]
    if missing:
        raise ShardFormatError(f"{path}: lacks tensors {missing}")
    for key in VOCAB_MAP_KEYS:
        if arrays[key].dtype != np.int64 or arrays[key].ndim != 1:
            found = f"{arrays[key].dtype}{list(arrays[key].shape)}"
            raise ShardFormatError(f"{path}: {key} must be a 1-D int64 array, got {found}")
    if arrays["overlap_teacher_ids"].shape != arrays["overlap_student_ids"].shape:
        raise ShardFormatError(f"{path}: overlap_teacher_ids and overlap_student_ids differ in length")
    return {key: arrays[key] for key in VOCAB_MAP_KEYS}
