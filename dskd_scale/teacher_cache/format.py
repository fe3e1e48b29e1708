"""The teacher hidden-state cache format (docs/design.md, "Teacher cache"): names, fingerprints, row codecs.

A cache folder holds, per shard ``K`` (a contiguous range of the prealigned folder's rows):
- ``hidden-KKKKK.bin``: the rows' final (post-norm) teacher hidden states, ``[R, E]`` row-major, as raw bf16
  (2 bytes/value, the upper half of the fp32 bits) or fp8 e4m3fn (1 byte/value);
- ``index-KKKKK.safetensors``: per example ``example_index [n]`` int64, ``row_offsets [n+1]`` int64 and
  ``teacher_ids_digest [n, 16]`` uint8 (sha256 prefix of the example's teacher input ids, int32 little-endian);
  per row ``positions [R]`` int32 (the teacher position ``p`` whose hidden state the row holds: it predicts the
  token at ``p + 1``) and, for fp8, ``scales [R]`` float32;
- ``records/shard-KKKKK.json``: the writer's per-shard record (plan, checksums) used for resume;
and, written last by rank 0 once every shard exists, ``manifest.json`` (the completion marker: a folder without
it is a cache whose writing was interrupted and is never read).

No deepspeed here, and nothing from the training side: the reader imports only this module and
``dskd_scale.data.format`` (a leaf), so any package may import the reader without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dskd_scale.data.format import IGNORE_INDEX, MANIFEST_FILE, canonical_json_bytes, file_sha256

CACHE_FORMAT = "dskd_scale.teacher_cache"
CACHE_VERSION = 1
MODES = ("aligned", "all_positions")
DTYPES = ("bf16", "fp8_e4m3")
CONFIG_KEY = "teacher.cache_dir"
RECORD_DIR = "records"
DIGEST_BYTES = 16
FP8_E4M3_MAX = 448.0
# Bytes per stored value; a row also stores its position (int32) and, for fp8, its scale (float32).
VALUE_BYTES = {"bf16": 2, "fp8_e4m3": 1}
ROW_OVERHEAD_BYTES = {"bf16": 4, "fp8_e4m3": 8}
# Weight files whose checksums make up a teacher fingerprint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLE_BYTES = 1 << 20


class CacheMismatch(ValueError):
    """A teacher cache that must not be used for this run; the message names ``teacher.cache_dir``, the field at
    fault and both values."""


def hidden_file_name(shard: int) -> str:
    return f"hidden-{shard:05d}.bin"


def index_file_name(shard: int) -> str:
    return f"index-{shard:05d}.safetensors"


def record_path(folder: Path, shard: int) -> Path:
    return folder / RECORD_DIR / f"shard-{shard:05d}.json"


def bytes_per_row(dtype: str, hidden_size: int) -> float:
    """Bytes one cached row (one teacher position) takes on disk: values plus its position and scale."""
    return float(VALUE_BYTES[dtype] * hidden_size + ROW_OVERHEAD_BYTES[dtype])


# ---- fingerprints ---------------------------------------------------------------------------------------------


def _sampled_file_digest(path: Path) -> dict[str, Any]:
    """Name, size and sha256 of the first and last MiB of a weight file (see ``teacher_fingerprint``)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            handle.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(handle.read(SAMPLE_BYTES))
    return {"name": path.name, "size": size, "head_tail_sha256": digest.hexdigest()}


def teacher_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 (hex) identifying a teacher model folder: its ``config.json`` bytes plus, per weight file
    (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``, sorted by name), the name, the byte size
    and the sha256 of its first and last MiB.

    Why not a full sha256 of the weights: the training side recomputes this on every start, on every rank, and a
    72B teacher is ~145 GB (minutes of reading per start). The sampled digest covers the config, every file's size,
    the safetensors header (tensor names, shapes, dtypes and offsets live in the first bytes) and the last tensor's
    tail, so another model, another checkpoint of different size or layout, another dtype or a truncated copy is
    caught; a same-sized file edited only in its middle is not.

    Raises:
        CacheMismatch: the folder or its ``config.json`` does not exist (naming the folder).
    """
    folder = Path(model_dir)
    config = folder / "config.json"
    if not config.is_file():
        raise CacheMismatch(f"{folder}: no config.json; teacher_fingerprint needs a Hugging Face model folder")
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(WEIGHT_SUFFIXES))
    identity = {"method": "config+weights(name,size,head/tail MiB sha256)",
                "config_sha256": file_sha256(config),
                "weights": [_sampled_file_digest(path) for path in files]}
    return hashlib.sha256(canonical_json_bytes(identity)).hexdigest()


def random_teacher_fingerprint(model_config: dict[str, Any], init_seed: int) -> str:
    """sha256 (hex) of a randomly initialised teacher (``teacher.architecture`` set, tests and demos): its
    transformers config (as ``to_dict()``, ``transformers_version`` left out) and the init seed."""
    config = {key: value for key, value in model_config.items() if key != "transformers_version"}
    identity = {"method": "random", "config": config, "init_seed": int(init_seed)}
    return hashlib.sha256(canonical_json_bytes(identity)).hexdigest()


def configured_teacher_fingerprint(teacher, tokenizer) -> str:
    """The fingerprint of a run's ``teacher`` section (``config.run.ModelConfig``), as the writer records it:
    ``teacher_fingerprint(teacher.path)`` for a model folder, ``random_teacher_fingerprint`` of the random build
    (``teacher.architecture`` set; ``tokenizer`` sizes its vocabulary) otherwise.

    Raises:
        CacheMismatch: ``teacher.path`` is not a local model folder (a Hub id cannot be fingerprinted offline:
            download it and point teacher.path at the folder).
    """
    if teacher.architecture:
        from dskd_scale.models.build import random_model_config

        return random_teacher_fingerprint(random_model_config(teacher, tokenizer).to_dict(), teacher.init_seed)
    if not Path(teacher.path).is_dir():
        raise CacheMismatch(f"teacher.path {teacher.path!r}: not a local model folder; the teacher cache "
                            "fingerprints the teacher's config.json and weight files, so it needs the folder")
    return teacher_fingerprint(teacher.path)


def data_fingerprint(prealigned_dir: str | os.PathLike) -> str:
    """sha256 (hex) of the prealigned folder's ``manifest.json`` bytes (it lists every shard's sha256)."""
    path = Path(prealigned_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CacheMismatch(f"{path}: missing; data_fingerprint needs a tools/prealign.py output folder")
    return file_sha256(path)


def text_fingerprint(prealigned_dir: str | os.PathLike) -> str:
    """sha256 (hex) of what fixes the teacher's tokens of a prealigned folder, independent of the student
    tokenizer: the source files (with checksums), the prompt format, ``max_length``, the truncation policy, bad-row
    handling and the teacher tokenizer's fingerprint. Folders prealigned for different students from the same
    data and teacher tokenizer share it; an ``all_positions`` cache is matched by it. (Truncation may still cut a
    long prompt at a point that depends on both tokenizers: the per-example teacher-id digests catch that.)"""
    path = Path(prealigned_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheMismatch(f"{path}: cannot read the prealigned manifest ({error})") from error
    identity = {key: manifest.get(key) for key in ("sources", "prompt_format", "max_length", "truncation",
                                                   "skip_bad_rows")}
    identity["teacher_tokenizer"] = (manifest.get("teacher_tokenizer") or {}).get("fingerprint")
    return hashlib.sha256(canonical_json_bytes(identity)).hexdigest()


def teacher_ids_digest(teacher_input_ids: np.ndarray) -> np.ndarray:
    """``[DIGEST_BYTES]`` uint8: sha256 prefix of one example's teacher input ids as int32 little-endian."""
    data = np.ascontiguousarray(np.asarray(teacher_input_ids), dtype="<i4").tobytes()
    return np.frombuffer(hashlib.sha256(data).digest()[:DIGEST_BYTES], dtype=np.uint8)


# ---- which rows -----------------------------------------------------------------------------------------------


def cached_positions(example: dict[str, np.ndarray], mode: str) -> np.ndarray:
    """``[R]`` int64 teacher positions whose hidden states the cache stores for one prealigned example.

    aligned: ``align_teacher - 1`` (the positions predicting the aligned teacher tokens), in pair order.
    all_positions: every position from (first response label position - 1) to ``L_t - 2`` (each predicts a
    response token); empty when the example has no teacher response label.
    """
    if mode == "aligned":
        return np.asarray(example["align_teacher"], dtype=np.int64) - 1
    labels = np.asarray(example["teacher_labels"])
    supervised = np.flatnonzero(labels != IGNORE_INDEX)
    if supervised.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(max(int(supervised[0]) - 1, 0), labels.size - 1, dtype=np.int64)


# ---- row codecs -----------------------------------------------------------------------------------------------


def encode_rows(rows_RE, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows (a torch tensor, any float dtype) -> ``(stored [R, E] uint16|uint8, scales [R] float32 | None)``.

    bf16: round to nearest even bf16 (relative error <= 2^-8 per value). fp8 e4m3: per row ``scale = amax / 448``
    (fp32; 1 for an all-zero row), values ``x / scale`` clamped to +-448 and rounded to e4m3fn (3 mantissa bits:
    relative error <= 2^-4 per value in the normal range, absolute <= 2^-10 * scale below 2^-6 * scale).
    """
    import torch

    rows = rows_RE.detach()
    if dtype == "bf16":
        return rows.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16), None
    if dtype == "fp8_e4m3":
        values = rows.to(torch.float32)
        amax = values.abs().amax(dim=1) if values.shape[0] else values.new_zeros(0)
        scales = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
        scaled = (values / scales[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        stored = scaled.to(torch.float8_e4m3fn).view(torch.uint8).cpu().numpy()
        return stored, scales.cpu().numpy().astype(np.float32)
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


_FP8_TABLE: np.ndarray | None = None


def _fp8_table() -> np.ndarray:
    """float32 value of each of the 256 e4m3fn bit patterns (NaN for the two NaN codes)."""
    global _FP8_TABLE
    if _FP8_TABLE is None:
        import torch

        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _FP8_TABLE = codes.view(torch.float8_e4m3fn).to(torch.float32).numpy()
    return _FP8_TABLE


def decode_rows(stored_RE: np.ndarray, scales_R: np.ndarray | None, dtype: str) -> np.ndarray:
    """Inverse of ``encode_rows``: ``[R, E]`` float32 (a new array)."""
    if dtype == "bf16":
        return (stored_RE.astype(np.uint32) << 16).view(np.float32)
    if dtype == "fp8_e4m3":
        return _fp8_table()[stored_RE] * scales_R[:, None]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

