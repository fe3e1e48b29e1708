"""Crash-safe DeepSpeed checkpoints: keep the last K, ``latest`` only ever names a complete one.

Layout under ``<output_dir>/checkpoints``::

    step_00000010/            DeepSpeed files (model, ZeRO partitions, optimizer, scheduler, client state)
        rng_rank00000.pt      this rank's Python/NumPy/torch RNG states
        run_config.yaml       the resolved run config; ds_config.json: the generated DeepSpeed dict
        COMPLETE              written by rank 0 after every rank finished writing
    latest                    tag of the newest complete checkpoint, replaced atomically after COMPLETE

DeepSpeed's own ``latest`` is written by rank 0 before the other ranks finish their ZeRO files, so it is
disabled (``save_latest=False``) and replaced by the protocol above. A checkpoint without ``COMPLETE``
(a crash mid-save) is never resumed from and is pruned later.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dskd_scale.data.format import atomic_write_bytes
from dskd_scale.engine.distributed import barrier, rank, world_size
from dskd_scale.utils.logging import get_logger

log = get_logger(__name__)

COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
_TAG_PATTERN = re.compile(r"^step_(\d+)$")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


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


def complete_tags(save_dir: Path) -> list[str]:
    """Tags of complete checkpoints, oldest first."""
    if not save_dir.is_dir():
        return []
    tags = [p.name for p in save_dir.iterdir()
            if _TAG_PATTERN.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=lambda tag: int(_TAG_PATTERN.match(tag).group(1)))


def latest_complete_tag(save_dir: Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one, else None."""
    latest = save_dir / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if (save_dir / tag / COMPLETE_MARKER).is_file():
            return tag
        log.warning("%s names %r, which is not a complete checkpoint; scanning for the newest complete one",
                    latest, tag)
    tags = complete_tags(save_dir)
    return tags[-1] if tags else None


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
    """
    tag = step_tag(step)
    started = time.perf_counter()
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir = save_dir / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{rank():05d}.pt")
    if rank() == 0:
        for name, text in extra_files.items():
            _atomic_write(tag_dir / name, text)
    barrier()  # every rank's ZeRO partition and RNG file is on disk
    if rank() == 0:
        marker = {"step": step, "world_size": world_size(), "time": time.time()}
        _atomic_write(tag_dir / COMPLETE_MARKER, json.dumps(marker))
        _atomic_write(save_dir / LATEST_FILE, tag)
        _prune(save_dir, keep=keep_last, current=tag)
        log.info("checkpoint %s saved in %.1fs", tag_dir, time.perf_counter() - started)
    barrier()
    return tag_dir


def _prune(save_dir: Path, *, keep: int, current: str) -> None:
    """Delete complete checkpoints beyond the newest ``keep``, and incomplete ones older than ``current``."""
    current_step = int(_TAG_PATTERN.match(current).group(1))
    complete = complete_tags(save_dir)
    doomed = [tag for tag in complete[:-keep] if tag != current]
    for path in save_dir.iterdir():
        match = _TAG_PATTERN.match(path.name)
        if match and not (path / COMPLETE_MARKER).is_file() and int(match.group(1)) < current_step:
            doomed.append(path.name)
    for tag in doomed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)


def load_checkpoint(engine, save_dir: Path, tag: str) -> dict[str, Any]:
    """Load ``tag`` into ``engine`` (module, optimizer, scheduler) and restore this rank's RNG; returns client state."""
    tag_dir = save_dir / tag
    if not (tag_dir / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{tag_dir}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
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
