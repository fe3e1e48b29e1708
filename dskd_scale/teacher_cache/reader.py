"""Training-side reader of a teacher hidden-state cache: verified once at open, then random access per example.

``TeacherCache.open`` refuses, with a ``CacheMismatch`` naming ``teacher.cache_dir``, the field and both values:
a folder without ``manifest.json`` (missing, or a write that never finished), another format or version, another
teacher (fingerprint), other data (fingerprint), another hidden size, and any shard file whose sha256 differs
from the manifest. Each shard's hidden rows are memory-mapped (the ranks of a node share the page cache); an
example's rows are found through its shard's ``row_offsets`` and decoded to float32 on read.

Which rows exist (``positions``): mode ``aligned`` holds the teacher positions ``align_teacher - 1`` of the
prealigned folder it was written from, in its pair order. Mode ``all_positions`` holds every position from
(first teacher response label position - 1) to ``L_t - 2``, the positions that predict response tokens; it
depends only on the teacher's tokens of the text, so students with any tokenizer share it: their alignment pairs
``align_teacher`` index the same teacher tokens, and ``aligned_rows``/``gather`` map ``align_teacher - 1`` onto
the stored positions (every aligned teacher token is a response token, so it is always there). That requires the
student's prealigned folder to hold the same teacher token ids per example, which the per-example teacher-id
digests check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd_scale.data.format import MANIFEST_FILE, file_sha256
from dskd_scale.teacher_cache.format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    CONFIG_KEY,
    DTYPES,
    MODES,
    CacheMismatch,
    bytes_per_row,
    decode_rows,
    teacher_ids_digest,
)

_INDEX_KEYS = ("example_index", "row_offsets", "teacher_ids_digest", "positions")


@dataclass(frozen=True)
class _Shard:
    example_index: np.ndarray  # [n] int64
    row_offsets: np.ndarray  # [n + 1] int64
    digests: np.ndarray  # [n, DIGEST_BYTES] uint8
    positions: np.ndarray  # [R] int32
    scales: np.ndarray | None  # [R] float32 (fp8 only)
    hidden: np.ndarray  # [R, E] uint16 | uint8, memory-mapped


class TeacherCache:
    """A verified teacher cache folder (``tools/cache_teacher.py`` output).

    Attributes:
        mode: ``"aligned"`` or ``"all_positions"``.
        dtype: ``"bf16"`` or ``"fp8_e4m3"`` (storage; reads are float32).
        hidden_size: ``E``, the teacher's hidden size.
        num_examples: examples the cache holds (one per row of the prealigned folder it was written from).
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], shards: list[_Shard]):
        self.folder = folder
        self.manifest = manifest
        self.mode: str = manifest["mode"]
        self.dtype: str = manifest["dtype"]
        self.hidden_size: int = int(manifest["hidden_size"])
        self._shards = shards
        example_index = np.concatenate([shard.example_index for shard in shards]) if shards else np.zeros(0, np.int64)
        shard_of = np.concatenate([np.full(s.example_index.size, k, np.int64) for k, s in enumerate(shards)]) \
            if shards else np.zeros(0, np.int64)
        local = np.concatenate([np.arange(s.example_index.size, dtype=np.int64) for s in shards]) \
            if shards else np.zeros(0, np.int64)
        order = np.argsort(example_index, kind="stable")
        self._sorted_index = example_index[order]
        self._shard_of = shard_of[order]
        self._local = local[order]
        self.num_examples = int(example_index.size)

    # ---- opening --------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | os.PathLike, *, teacher_fingerprint: str, data_fingerprint: str, hidden_size: int,
             text_fingerprint: str | None = None, verify_checksums: bool = True) -> TeacherCache:
        """Open and verify a cache folder for a run with this teacher, data and hidden size.

        Args:
            folder: the cache folder (``teacher.cache_dir``).
            teacher_fingerprint: ``teacher_fingerprint(teacher.path)`` (or ``random_teacher_fingerprint`` of a
                randomly initialised teacher) of the configured teacher.
            data_fingerprint: ``data_fingerprint(data.train_dir)`` of the configured prealigned folder.
            hidden_size: the configured teacher's hidden size.
            text_fingerprint: ``text_fingerprint(data.train_dir)``. An ``all_positions`` cache written from
                another prealigned folder (another student tokenizer) is accepted when this matches; its rows are
                then used only through ``aligned_rows``/``gather`` with the example's teacher ids.
            verify_checksums: sha256 every shard file against the manifest (reads the whole cache once; turn off
                only where the files were verified already, e.g. by another rank of the same node).

        Raises:
            CacheMismatch: naming ``teacher.cache_dir``, the field at fault and both values.
        """
        path = Path(folder)
        manifest = _read_manifest(path)
        expected = {"format": CACHE_FORMAT, "format_version": CACHE_VERSION}
        for field, value in expected.items():
            if manifest.get(field) != value:
                raise _mismatch(path, field, manifest.get(field), value, "write it again with tools/cache_teacher.py")
        for field, allowed in (("mode", MODES), ("dtype", DTYPES)):
            if manifest.get(field) not in allowed:
                raise _mismatch(path, field, manifest.get(field), " or ".join(allowed), "unknown value")
        if manifest.get("teacher_fingerprint") != teacher_fingerprint:
            raise _mismatch(path, "teacher_fingerprint", manifest.get("teacher_fingerprint"), teacher_fingerprint,
                            f"the cache was written by teacher {manifest.get('teacher', {}).get('path')!r}, not the "
                            "configured teacher (teacher.path)")
        if manifest.get("data_fingerprint") != data_fingerprint:
            shared = manifest.get("mode") == "all_positions" and text_fingerprint is not None
            if not shared or manifest.get("text_fingerprint") != text_fingerprint:
                field, found, wanted = ("data_fingerprint", manifest.get("data_fingerprint"), data_fingerprint)
                if shared:
                    field, found, wanted = ("text_fingerprint", manifest.get("text_fingerprint"), text_fingerprint)
                raise _mismatch(path, field, found, wanted,
                                f"the cache was written from {manifest.get('data_dir')!r}, other data than "
                                "data.train_dir")
        if int(manifest.get("hidden_size", -1)) != int(hidden_size):
            raise _mismatch(path, "hidden_size", manifest.get("hidden_size"), hidden_size,
                            "the configured teacher's hidden size differs")
        try:
            shards = [_open_shard(path, entry, manifest, verify_checksums) for entry in manifest.get("shards", [])]
        except (KeyError, TypeError) as error:
            raise CacheMismatch(f"{CONFIG_KEY}={path}: manifest.json field 'shards' is malformed (no {error}); "
                                "write the cache again with tools/cache_teacher.py") from error
        cache = cls(path, manifest, shards)
        if cache.num_examples != int(manifest.get("num_examples", -1)):
            raise _mismatch(path, "num_examples", manifest.get("num_examples"), cache.num_examples,
                            "the shard indices hold another number of examples")
        return cache

    # ---- access ---------------------------------------------------------------------------------------------

    def bytes_per_row(self) -> float:
        """Bytes on disk per cached row (= per cached teacher token): values plus position and scale."""
        return bytes_per_row(self.dtype, self.hidden_size)

    def _locate(self, example_index: int) -> tuple[_Shard, int]:
        at = int(np.searchsorted(self._sorted_index, example_index))
        if at >= self._sorted_index.size or int(self._sorted_index[at]) != int(example_index):
            raise CacheMismatch(f"{CONFIG_KEY}={self.folder}: holds no example with example_index {example_index} "
                                f"(it holds {self.num_examples} examples of {self.manifest.get('data_dir')!r})")
        return self._shards[int(self._shard_of[at])], int(self._local[at])

    def positions(self, example_index: int) -> np.ndarray:
        """``[R]`` int64: the teacher positions whose hidden states ``rows(example_index)`` holds, in order."""
        shard, local = self._locate(example_index)
        start, stop = int(shard.row_offsets[local]), int(shard.row_offsets[local + 1])
        return shard.positions[start:stop].astype(np.int64)

    def rows(self, example_index: int) -> torch.Tensor:
        """``[R, E]`` float32: the example's cached final teacher hidden states (see ``positions``).

        ``example_index`` is the prealigned ``example_index`` column (``batch["example_index"]``)."""
        shard, local = self._locate(example_index)
        start, stop = int(shard.row_offsets[local]), int(shard.row_offsets[local + 1])
        scales = None if shard.scales is None else shard.scales[start:stop]
        return torch.from_numpy(decode_rows(np.asarray(shard.hidden[start:stop]), scales, self.dtype))

    def check_teacher_ids(self, example_index: int, teacher_input_ids: np.ndarray) -> None:
        """Refuse an example whose teacher token ids differ from the ones the cache was computed on."""
        shard, local = self._locate(example_index)
        if not np.array_equal(teacher_ids_digest(teacher_input_ids), shard.digests[local]):
            raise CacheMismatch(
                f"{CONFIG_KEY}={self.folder}: field teacher_ids_digest of example_index {example_index} is "
                f"{shard.digests[local].tobytes().hex()}, the configured data gives "
                f"{teacher_ids_digest(teacher_input_ids).tobytes().hex()}: the teacher tokens of this example differ "
                "(another prompt format, truncation or teacher tokenizer); write the cache from this data")

    def aligned_rows(self, example_index: int, align_teacher: np.ndarray,
                     teacher_input_ids: np.ndarray | None = None) -> torch.Tensor:
        """``[A, E]`` float32: the teacher hidden state at ``align_teacher[a] - 1`` for each pair ``a``.

        Works for both modes (in ``all_positions`` the alignment may come from any student's prealigned folder).
        With ``teacher_input_ids`` (the example's unpadded teacher ids) the example's digest is checked first.
        """
        if teacher_input_ids is not None:
            self.check_teacher_ids(example_index, teacher_input_ids)
        wanted = np.asarray(align_teacher, dtype=np.int64) - 1
        stored = self.positions(example_index)
        rows = self._row_numbers(example_index, stored, wanted)
        return self.rows(example_index)[torch.from_numpy(rows)]

    def _row_numbers(self, example_index: int, stored: np.ndarray, wanted: np.ndarray) -> np.ndarray:
        if self.mode == "aligned":
            if not np.array_equal(stored, wanted):
                raise CacheMismatch(
                    f"{CONFIG_KEY}={self.folder}: field positions of example_index {example_index} holds teacher "
                    f"positions {stored[:8].tolist()}..., the batch asks for {wanted[:8].tolist()}... (mode "
                    "aligned serves only the alignment it was written for; write an all_positions cache)")
            return np.arange(stored.size)
        rows = wanted - (stored[0] if stored.size else 0)
        inside = (rows >= 0) & (rows < stored.size)
        if not inside.all() or not np.array_equal(stored[rows], wanted):
            bad = int(wanted[~inside][0]) if not inside.all() else int(wanted[0])
            raise CacheMismatch(
                f"{CONFIG_KEY}={self.folder}: field positions of example_index {example_index} covers teacher "
                f"positions {stored[:1].tolist()}..{stored[-1:].tolist()}, the batch asks for position {bad} "
                "(not a response-predicting position of this example)")
        return rows

    def gather(self, batch: dict[str, torch.Tensor], *, check_ids: bool = True) -> torch.Tensor:
        """``[A, E]`` float32 for a collated batch (Contract 2): row ``a`` is the teacher hidden state at
        ``(align_batch[a], align_teacher[a] - 1)``, i.e. ``teacher_hidden_BTE[align_batch, align_teacher - 1]``
        of a live teacher.

        Args:
            batch: needs ``example_index [B]``, ``align_batch [A]``, ``align_teacher [A]`` and, with ``check_ids``,
                ``teacher_input_ids``/``teacher_attention_mask [B, T]``.
            check_ids: verify each example's teacher-id digest (cheap; required when the cache was matched by
                ``text_fingerprint``).
        """
        align_batch = batch["align_batch"].cpu().numpy()
        align_teacher = batch["align_teacher"].cpu().numpy()
        example_index = batch["example_index"].cpu().numpy()
        out = torch.empty((align_batch.size, self.hidden_size), dtype=torch.float32)
        starts = np.searchsorted(align_batch, np.arange(example_index.size + 1))
        for b, index in enumerate(example_index.tolist()):
            start, stop = int(starts[b]), int(starts[b + 1])
            if check_ids:
                length = int(batch["teacher_attention_mask"][b].sum())
                self.check_teacher_ids(index, batch["teacher_input_ids"][b, :length].cpu().numpy())
            if stop > start:  # a repeat slot (is_repeat) has no pairs left in the batch
                out[start:stop] = self.aligned_rows(index, align_teacher[start:stop])
        return out

    def batch_hidden(self, batch: dict[str, torch.Tensor], *, check_ids: bool = True) -> torch.Tensor:
        """``[B, T, E]`` float32, zero except at the aligned rows ``(align_batch, align_teacher - 1)``, which hold
        the cached hidden states: a stand-in for the live teacher's output for criteria that read only those
        rows."""
        batch_size, length = batch["teacher_input_ids"].shape
        hidden = torch.zeros((batch_size, length, self.hidden_size), dtype=torch.float32)
        hidden[batch["align_batch"].cpu(), batch["align_teacher"].cpu() - 1] = self.gather(batch, check_ids=check_ids)
        return hidden

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.folder)!r}, mode={self.mode}, dtype={self.dtype}, "
                f"examples={self.num_examples}, hidden_size={self.hidden_size})")


# ---- helpers --------------------------------------------------------------------------------------------------


def _mismatch(folder: Path, field: str, found: Any, wanted: Any, why: str) -> CacheMismatch:
    return CacheMismatch(f"{CONFIG_KEY}={folder}: manifest field {field!r} is {found!r}, this run needs {wanted!r} "
                         f"({why})")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CacheMismatch(f"{CONFIG_KEY}={folder}: not a directory; write a cache with tools/cache_teacher.py")
    if not path.is_file():
        raise CacheMismatch(
            f"{CONFIG_KEY}={folder}: field manifest.json is missing: the cache is incomplete (its writing was "
            "interrupted or is still running) or this is not a tools/cache_teacher.py folder; re-run "
            "tools/cache_teacher.py with the same arguments to finish it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CacheMismatch(f"{CONFIG_KEY}={folder}: {path} is not readable JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise CacheMismatch(f"{CONFIG_KEY}={folder}: {path} holds {type(manifest).__name__}, not a mapping")
    return manifest


def _open_shard(folder: Path, entry: dict[str, Any], manifest: dict[str, Any], verify: bool) -> _Shard:
    from safetensors.numpy import load_file

    for key in ("index", "hidden"):
        path = folder / entry[f"{key}_file"]
        if not path.is_file():
            raise CacheMismatch(f"{CONFIG_KEY}={folder}: shard file {path.name} listed in manifest.json is missing")
        if verify:
            actual = file_sha256(path)
            if actual != entry[f"{key}_sha256"]:
                raise _mismatch(folder, f"shards[{entry['shard']}].{key}_sha256", entry[f"{key}_sha256"], actual,
                                f"{path.name} is corrupted or was changed after writing")
    index = load_file(str(folder / entry["index_file"]))
    missing = [key for key in _INDEX_KEYS if key not in index]
    if missing:
        raise CacheMismatch(f"{CONFIG_KEY}={folder}: {entry['index_file']} lacks {missing}")
    rows, hidden_size = int(index["row_offsets"][-1]), int(manifest["hidden_size"])
    if rows != int(entry["rows"]) or index["positions"].size != rows:
        raise _mismatch(folder, f"shards[{entry['shard']}].rows", entry["rows"], rows, "index and manifest differ")
    value_type = np.uint16 if manifest["dtype"] == "bf16" else np.uint8
    hidden_path = folder / entry["hidden_file"]
    expected_bytes = rows * hidden_size * np.dtype(value_type).itemsize
    if hidden_path.stat().st_size != expected_bytes:
        raise _mismatch(folder, f"shards[{entry['shard']}].hidden bytes", hidden_path.stat().st_size, expected_bytes,
                        f"{hidden_path.name} does not hold rows x hidden_size values")
    hidden = (np.memmap(hidden_path, dtype=value_type, mode="r", shape=(rows, hidden_size)) if rows
              else np.zeros((0, hidden_size), dtype=value_type))
    return _Shard(example_index=index["example_index"].astype(np.int64), row_offsets=index["row_offsets"],
                  digests=index["teacher_ids_digest"], positions=index["positions"],
                  scales=index.get("scales"), hidden=hidden)
