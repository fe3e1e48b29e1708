"""The training data loader: prealigned dataset + resumable sampler + dynamic-padding collate.

Consumption is counted when a batch is *handed to the caller* (the training step), never when a worker
prefetches it: a checkpoint whose ``state_dict()`` is taken after step ``k`` resumes with batch ``k + 1``, with
any ``num_workers``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dskd_scale.data.collate import Collator
from dskd_scale.data.dataset import DataError, PrealignedDataset
from dskd_scale.data.sampler import ResumableDistributedSampler

__all__ = ["CachedTeacherRows", "TrainLoader", "build_train_loader", "pad_id_from_manifest"]


class TrainLoader:
    """Iterating yields Contract 2 batches for the rest of the current epoch, then moves to the next epoch.

    So ``for batch in loader`` runs one (possibly resumed) epoch, and the next ``for`` runs the next one. Breaking
    out early keeps the position: the next iteration continues with the first batch not yet handed out.

    Args:
        dataset: examples by index (``ds[i]`` -> dict of numpy arrays).
        sampler: yields this rank's micro-batches and holds the resumable position.
        collator: turns a list of examples into a batch.
        num_workers: DataLoader worker processes (0: collate in this process; collation is vectorised and cheap).
        pin_memory: pin batches for asynchronous host-to-GPU copies.
        prefetch_factor: batches each worker prepares ahead (only with ``num_workers > 0``).
        teacher_rows: with a teacher hidden-state cache, ``CachedTeacherRows``: each example then carries its
            cached rows and batches gain ``teacher_hidden_rows`` (random access by example, so the order is the
            sampler's as without a cache).
    """

    def __init__(
        self,
        dataset: PrealignedDataset,
        sampler: ResumableDistributedSampler,
        collator: Collator,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        teacher_rows: CachedTeacherRows | None = None,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.sampler = sampler
        self.collator = collator
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.teacher_rows = teacher_rows
        self._data_identity: str | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def consumed_micro_batches(self) -> int:
        """Micro-batches of the current epoch already handed to the caller."""
        return self.sampler.consumed_micro_batches

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.sampler.micro_batches_per_epoch

    def __len__(self) -> int:
        return self.sampler.micro_batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.sampler.remaining_micro_batches == 0:
            self.sampler.set_epoch(self.sampler.epoch + 1)
        for batch in self._batches(self._micro_batch_keys()):
            # Counted before the hand-over: once the caller holds the batch, a checkpoint must not replay it.
            self.sampler.advance(1)
            yield batch
        self.sampler.set_epoch(self.sampler.epoch + 1)

    def _micro_batch_keys(self) -> Iterator[list[tuple[int, bool]]]:
        """``[(sample index, is_repeat), ...]`` per remaining micro-batch of the current epoch, made lazily."""
        epoch, start = self.sampler.epoch, self.sampler.consumed_micro_batches
        indices, repeats = self.sampler.rank_micro_batches(epoch), self.sampler.rank_repeat_mask(epoch)
        for row in range(start, indices.shape[0]):
            yield list(zip(indices[row].tolist(), repeats[row].tolist(), strict=True))

    def _batches(self, micro_batches: Iterator[list[tuple[int, bool]]]) -> Iterator[dict[str, torch.Tensor]]:
        examples = _RepeatMarkingView(self.dataset, self.teacher_rows)
        if self.num_workers == 0:
            for keys in micro_batches:
                batch = self.collator([examples[key] for key in keys])
                yield {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch
            return
        # A fresh DataLoader per epoch pass over exactly the remaining micro-batches; it may run ahead by
        # num_workers * prefetch_factor batches, which is why consumption is counted in __iter__, not here.
        yield from DataLoader(
            examples,
            batch_sampler=micro_batches,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )

    def data_identity(self) -> str:
        """sha256 over the shard checksums and the rows of this view: equal only for the same examples in order."""
        if self._data_identity is None:
            self._data_identity = _data_identity(self.dataset)
        return self._data_identity

    def state_dict(self) -> dict[str, Any]:
        """The sampler's resumable position plus the data identity (JSON-safe); save it with the checkpoint."""
        return {**self.sampler.state_dict(), "data_identity": self.data_identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position.

        Raises:
            DataError: if the data (shards or holdout split) or an order-defining sampler setting changed since the
                state was saved: the same position in other data would silently skip or repeat examples.
        """
        saved = state.get("data_identity")
        if saved != self.data_identity():
            raise DataError(
                f"cannot resume the data order: loader state field 'data_identity' is {saved!r} but the data now "
                f"is {self.data_identity()!r} ({self.dataset.path}); the shards or the holdout split changed since "
                "the checkpoint. Resume with the same prealigned data and data settings"
            )
        self.sampler.load_state_dict(state)


def _data_identity(dataset: PrealignedDataset) -> str:
    digest = hashlib.sha256()
    for shard in dataset.manifest["shards"]:
        digest.update(f"{shard['file']}:{shard['sha256']};".encode())
    digest.update(np.ascontiguousarray(dataset.rows, dtype=np.int64).tobytes())
    return digest.hexdigest()


class _RepeatMarkingView:
    """``view[(index, is_repeat)]`` -> ``dataset[index]`` with the sampler's repeat flag added for the collator
    (and the example's cached teacher rows, with a cache)."""

    def __init__(self, dataset: PrealignedDataset, teacher_rows: CachedTeacherRows | None = None):
        self.dataset = dataset
        self.teacher_rows = teacher_rows

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, Any]:
        index, is_repeat = key
        example = {**self.dataset[index], "is_repeat": is_repeat}
        if self.teacher_rows is not None:
            example["teacher_hidden_rows"] = self.teacher_rows(example)
        return example


class CachedTeacherRows:
    """An example's rows of a teacher hidden-state cache, one per alignment pair: ``[A_i, E]`` float32.

    Row ``a`` is the teacher's final hidden state at ``align_teacher[a] - 1`` (the position that predicts the
    aligned token), as ``teacher_hidden_BTE[b, align_teacher - 1]`` of a live teacher. Works for an ``aligned``
    cache (exactly these rows) and an ``all_positions`` one (every teacher response position, so one cache serves
    students with any tokenizer); each example's teacher token ids are checked against the cache's digest.

    Args:
        cache: an opened ``dskd_scale.teacher_cache.TeacherCache``.
    """

    def __init__(self, cache: Any):
        self.cache = cache

    def __call__(self, example: Mapping[str, np.ndarray]) -> np.ndarray:
        from dskd_scale.teacher_cache import CacheMismatch

        try:
            rows = self.cache.aligned_rows(int(example["example_index"]), example["align_teacher"],
                                           example["teacher_input_ids"])
        except CacheMismatch as err:
            raise DataError(str(err)) from err
        return rows.numpy()


def pad_id_from_manifest(manifest: Mapping[str, Any], side: str) -> int:
    """The ``side`` tokenizer's pad id recorded in the manifest, else its EOS id (padding is masked out anyway)."""
    record = manifest.get(f"{side}_tokenizer") or {}
    for field in ("pad_token_id", "eos_token_id"):
        if record.get(field) is not None:
            return int(record[field])
    raise DataError(
        f"manifest.json: neither '{side}_tokenizer.pad_token_id' nor '{side}_tokenizer.eos_token_id' is set; "
        f"pass {side}_pad_id explicitly"
    )


def build_train_loader(
    dataset: PrealignedDataset,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    seed: int,
    group_by_length: bool,
    group_window_steps: int = 50,
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    student_pad_id: int | None = None,
    teacher_pad_id: int | None = None,
    teacher_rows: CachedTeacherRows | None = None,
) -> TrainLoader:
    """A resumable loader over ``dataset`` for one data-parallel rank.

    Every rank must call this with the same arguments except ``rank``; all ranks then take the same number of
    micro-batches per epoch (``len(loader)``; see ``ResumableDistributedSampler`` for ``drop_last`` and for
    ``group_window_steps``). Length grouping sorts by student + teacher token count, since both sides are padded.
    Pad ids default to the manifest's pad (else EOS) ids. For evaluation use ``shuffle=False, drop_last=False``:
    every example is then counted exactly once over all ranks, with ranks still in lockstep.
    """
    manifest = dataset.manifest
    lengths = None
    if group_by_length:
        lengths = np.asarray(dataset.lengths) + np.asarray(dataset.teacher_lengths)
    sampler = ResumableDistributedSampler(
        len(dataset),
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        lengths=lengths,
        group_by_length=group_by_length,
        group_window_steps=group_window_steps,
    )
    collator = Collator(
        student_pad_id=pad_id_from_manifest(manifest, "student") if student_pad_id is None else student_pad_id,
        teacher_pad_id=pad_id_from_manifest(manifest, "teacher") if teacher_pad_id is None else teacher_pad_id,
    )
    return TrainLoader(dataset, sampler, collator, num_workers=num_workers, pin_memory=pin_memory,
                       teacher_rows=teacher_rows)
