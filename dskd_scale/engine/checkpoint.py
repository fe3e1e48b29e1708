"""Crash-safe DeepSpeed checkpoints: keep the last K, ``latest`` only ever names a complete, verified one.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            DeepSpeed files (model, ZeRO partitions, optimizer, scheduler, client state)
        rng_rank00000.pt      this rank's Python/NumPy/torch RNG states
        run_config.yaml       the resolved run config; ds_config.json: the generated DeepSpeed dict
        COMPLETE              written by rank 0 after every rank wrote and fsynced its files; lists every
                              file of the checkpoint with its size
    latest                    tag of the newest complete checkpoint, replaced atomically after COMPLETE

DeepSpeed's own ``latest`` is written by rank 0 before the other ranks finish their ZeRO files, so it is
disabled (``save_latest=False``) and replaced by the protocol above. Order of a save: every rank writes and
fsyncs its own files -> agreement (one all-reduce) -> rank 0 writes COMPLETE (with the file list), then
``latest`` (each atomic and fsynced) -> prune. Pruning removes COMPLETE first (fsynced), so a kill while an old
checkpoint is being deleted never leaves a folder that claims to be complete. Resume takes the newest
checkpoint whose COMPLETE file list matches the files on disk (``latest`` may lag behind it by a kill between
COMPLETE and ``latest``); a checkpoint without COMPLETE (a crash mid-save) is never resumed from and is pruned
later.

Before writing, the ranks check together that the filesystem has room for one more checkpoint (the size of the
last one, else a lower bound from the optimizer partitions); a write that still fails (ENOSPC, EIO, quota)
raises ``CheckpointWriteError`` naming the folder and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd_scale.data.format import atomic_write_bytes, fsync_directory
from dskd_scale.engine.distributed import all_reduce_sum, device, rank, world_size
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
_TAG_PATTERN = re.compile(r"^step_(\d+)$")
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")
# A write failure that leaves less than this free is reported as a full filesystem: torch's serialiser raises a
# RuntimeError without errno, so the cause is read from the filesystem itself.
_FULL_BELOW_BYTES = 1 << 20
# Optimizer state per trainable element in a ZeRO checkpoint: fp32 master copy + Adam's two moments.
_BYTES_PER_TRAINABLE_ELEMENT = 12


# Write failures that another node, a later time or a cleaned-up disk can cure: the job may be requeued.
_RESUMABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; ``latest`` still names the previous complete one.

    ``reporter`` is False on ranks that only learned from another rank that the save failed (they stay quiet
    so the job prints one message). ``resumable``: the cause is space or I/O (requeue and resume), not e.g. a
    permission error that a requeue would only repeat."""

    def __init__(self, message: str, *, reporter: bool = True, resumable: bool = True) -> None:
        super().__init__(message)
        self.reporter = reporter
        self.resumable = resumable


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def _tag_step(tag: str) -> int:
    return int(_TAG_PATTERN.match(tag).group(1))


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _files(tag_dir: Path) -> dict[str, int]:
    """Every file under ``tag_dir`` except COMPLETE: relative path -> size in bytes."""
    return {p.relative_to(tag_dir).as_posix(): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER}


def verify(tag_dir: Path) -> str | None:
    """None if ``tag_dir`` is a complete checkpoint whose files match its COMPLETE list, else what is wrong."""
    marker = tag_dir / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker"
    try:
        listed = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError) as err:
        return f"unreadable {COMPLETE_MARKER} marker ({err})"
    if listed is None:
        return None  # written before COMPLETE carried a file list: nothing to compare against
    for name, size in listed.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {COMPLETE_MARKER} lists {size}"
    return None


def complete_tags(save_dir: Path) -> list[str]:
    """Tags with a COMPLETE marker (not yet verified), oldest first."""
    if not save_dir.is_dir():
        return []
    tags = [p.name for p in save_dir.iterdir()
            if _TAG_PATTERN.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=_tag_step)


def latest_complete_tag(save_dir: Path) -> str | None:
    """The newest checkpoint that verifies, else None.

    Normally the one ``latest`` names; newer when a kill came between COMPLETE and ``latest``; older when the one
    ``latest`` names lost files since (each skipped checkpoint is logged with the reason)."""
    latest = save_dir / LATEST_FILE
    named = latest.read_text().strip() if latest.is_file() else None
    for tag in reversed(complete_tags(save_dir)):
        problem = verify(save_dir / tag)
        if problem is None:
            if named is not None and named != tag:
                log.warning("%s names %r; the newest complete checkpoint is %s", latest, named, tag)
            return tag
        log.warning("%s: not resuming from it: %s", save_dir / tag, problem)
    if named is not None:
        log.warning("%s names %r, which is not a complete checkpoint, and no other is", latest, named)
    return None


def mark_latest(save_dir: Path, tag: str) -> None:
    """Point ``latest`` at ``tag`` (atomic and fsynced; rank 0 only)."""
    latest = save_dir / LATEST_FILE
    if not latest.is_file() or latest.read_text().strip() != tag:
        _atomic_write(latest, tag)


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _describe_failure(err: BaseException, path: Path) -> tuple[str, bool]:
    """The cause of a failed write in words, and whether it is resumable: the OS error if the exception chain
    holds one, else the filesystem's state (torch's serialiser reports ENOSPC without errno)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            return f"{os.strerror(seen.errno)} ({name})", seen.errno in _RESUMABLE_ERRNOS
        seen = seen.__cause__ or seen.__context__
    try:
        free = _free_bytes(path)
    except OSError:
        free = None
    if free is not None and free < _FULL_BELOW_BYTES:
        return f"No space left on device (ENOSPC: {free} bytes free on that filesystem)", True
    first_line = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first_line}".rstrip(": "), True


def _previous_tag_text(save_dir: Path) -> str:
    latest = save_dir / LATEST_FILE
    if latest.is_file():
        return f"`latest` still names {latest.read_text().strip()}, complete; the run resumes from it"
    return "no complete checkpoint exists yet; a rerun starts from step 0"


def _trainable_partition_elements(engine) -> float:
    """This rank's share of the trainable elements (numel only, no data access): its ZeRO-3 partition, else an
    even share (ZeRO-1/2 partition the optimizer state; ZeRO-0 saves it once), so the sum over ranks is the
    number of trainable elements, never more."""
    share = 1.0 / world_size()
    return sum(float(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() * share
               for p in engine.module.parameters() if p.requires_grad)


def _check_space(engine, save_dir: Path, tag_dir: Path) -> None:
    """Collective: refuse (on every rank) to start a save that cannot fit on some rank's filesystem.

    Needed bytes: the size of the newest complete checkpoint (rank 0 measures it), else a lower bound (fp32
    master + Adam moments of the trainable elements). Each rank compares with the free space it sees: right for
    the shared filesystem checkpoints live on (resume needs one); node-local folders get a conservative check."""
    world, me = world_size(), rank()
    packed = torch.zeros(world + 2, dtype=torch.float64)
    packed[me] = float(_free_bytes(save_dir))
    packed[world] = float(_trainable_partition_elements(engine) * _BYTES_PER_TRAINABLE_ELEMENT)
    if me == 0:
        previous = complete_tags(save_dir)
        if previous:
            packed[world + 1] = float(sum(_files(save_dir / previous[-1]).values()))
    packed = all_reduce_sum(packed.to(device())).cpu().tolist()
    needed = packed[world + 1] or packed[world]
    short = [r for r in range(world) if packed[r] < needed]
    if short:
        free = min(packed[r] for r in short)
        raise CheckpointWriteError(
            f"cannot write checkpoint {tag_dir}: No space left on device (ENOSPC, checked before writing: "
            f"{free / 2**20:.1f} MiB free on the filesystem of {save_dir} for rank(s) {short}, a checkpoint needs "
            f"{needed / 2**20:.1f} MiB); {_previous_tag_text(save_dir)} once there is space", reporter=me == 0)


def _fsync_own_files(tag_dir: Path) -> None:
    """fsync the files this rank wrote (its ZeRO partition and RNG state; rank 0 also every shared file)."""
    me = rank()
    for path in sorted(tag_dir.rglob("*")):
        if not path.is_file():
            continue
        match = _RANK_FILE.search(path.name)
        owner = int(match.group(1) or match.group(2)) if match else 0
        if owner == me:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [tag_dir, *(p for p in tag_dir.rglob("*") if p.is_dir())]:
        fsync_directory(directory)


def _agree(failure: tuple[str, bool] | None, tag_dir: Path, save_dir: Path) -> None:
    """Collective: raise on every rank if any rank failed (the failing rank reports, the others stay quiet)."""
    failed = all_reduce_sum(torch.tensor([1.0 if failure else 0.0], dtype=torch.float64, device=device()))
    if float(failed.item()) == 0:
        return
    if rank() == 0:
        _remove(tag_dir)  # never trusted (`latest` was not moved to it); free the space now
    if failure:
        cause, resumable = failure
        raise CheckpointWriteError(f"cannot write checkpoint {tag_dir} (rank {rank()}): {cause}; "
                                   f"{_previous_tag_text(save_dir)}", resumable=resumable)
    raise CheckpointWriteError(f"checkpoint {tag_dir}: another rank failed to write it", reporter=False)


def save_checkpoint(engine, save_dir: Path, step: int, *, client_state: dict[str, Any],
                    extra_files: dict[str, str], keep_last: int) -> Path:
    """Save on all ranks (collective); mark complete, move ``latest`` and prune on rank 0.

    Args:
        engine: the trained DeepSpeed engine.
        save_dir: ``<output_dir>/checkpoints``.
        step: optimizer step count after the step just taken (the tag).
        client_state: JSON/pickle-safe loop state (sampler position, counters); identical on all ranks.
        extra_files: file name -> text, written into the tag folder by rank 0 (run config, DS config).
        keep_last: complete checkpoints to keep.

    Raises:
        CheckpointWriteError: not enough space (raised on every rank before anything is written), or a write
            failed. A failure inside DeepSpeed's own save is raised on the failing rank only: DeepSpeed's
            collectives cannot be joined from outside, so the other ranks are stopped by the launcher.
    """
    tag = step_tag(step)
    started = time.perf_counter()
    tag_dir = save_dir / tag
    save_dir.mkdir(parents=True, exist_ok=True)
    if rank() == 0 and tag_dir.exists():
        _remove(tag_dir)  # an earlier attempt at this step that never verified: start clean
    _check_space(engine, save_dir, tag_dir)  # its all-reduce also orders that removal before any rank writes
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as err:
        cause, resumable = _describe_failure(err, tag_dir)
        _remove(tag_dir)  # no COMPLETE, never trusted: free the space (the job stops here anyway)
        raise CheckpointWriteError(f"cannot write checkpoint {tag_dir} (rank {rank()}): {cause}; "
                                   f"{_previous_tag_text(save_dir)}", resumable=resumable) from err
    failure = None
    try:
        torch.save(rng_state(), tag_dir / f"rng_rank{rank():05d}.pt")
        if rank() == 0:
            for name, text in extra_files.items():
                _atomic_write(tag_dir / name, text)
        _fsync_own_files(tag_dir)
    except (OSError, RuntimeError) as err:
        failure = _describe_failure(err, tag_dir)
    _agree(failure, tag_dir, save_dir)  # every rank's files are on disk (and fsynced)
    if rank() == 0:
        try:
            marker = {"step": step, "world_size": world_size(), "time": time.time(), "files": _files(tag_dir)}
            _atomic_write(tag_dir / COMPLETE_MARKER, json.dumps(marker))
            mark_latest(save_dir, tag)
        except OSError as err:
            failure = _describe_failure(err, tag_dir)
        if failure is None:
            _prune(save_dir, keep=keep_last, current=tag)
            log.info("checkpoint %s saved in %.1fs", tag_dir, time.perf_counter() - started)
    _agree(failure, tag_dir, save_dir)
    return tag_dir


def _remove(tag_dir: Path) -> None:
    """Delete a checkpoint folder so that no kill leaves it claiming to be complete: COMPLETE goes first."""
    marker = tag_dir / COMPLETE_MARKER
    if marker.exists():
        marker.unlink()
        fsync_directory(tag_dir)
    shutil.rmtree(tag_dir, ignore_errors=True)


def _prune(save_dir: Path, *, keep: int, current: str) -> None:
    """Delete complete checkpoints beyond the newest ``keep``, and incomplete ones older than ``current``."""
    current_step = _tag_step(current)
    complete = complete_tags(save_dir)
    doomed = [tag for tag in complete[:-keep] if tag != current]
    for path in save_dir.iterdir():
        match = _TAG_PATTERN.match(path.name)
        if match and not (path / COMPLETE_MARKER).is_file() and int(match.group(1)) < current_step:
            doomed.append(path.name)
    for tag in doomed:
        _remove(save_dir / tag)


def load_checkpoint(engine, save_dir: Path, tag: str) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` (module, optimizer, scheduler) and restore this rank's RNG; returns client state."""
    tag_dir = save_dir / tag
    problem = verify(tag_dir)
    if problem is not None:
        raise FileNotFoundError(f"{tag_dir}: not a complete checkpoint: {problem}")
    saved_world = json.loads((tag_dir / COMPLETE_MARKER).read_text())["world_size"]
    load_path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rng_file = tag_dir / f"rng_rank{rank():05d}.pt"
    if saved_world == world_size() and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s: saved with %d ranks, resuming with %d: RNG states not restored",
                    tag_dir, saved_world, world_size())
    return client_state
