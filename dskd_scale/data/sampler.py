"""Deterministic, exactly resumable distributed micro-batch sampler.

Order model. Epoch ``e`` uses one permutation of all samples keyed by ``(seed, e)`` (``stable_permutation``: the
same on every platform and library version); every rank computes the same one.
The epoch is cut into *global steps* of ``G = micro_batch_size * world_size`` samples, and at step ``k`` rank ``r``
takes the ``r``-th micro-batch of step ``k``'s samples. Ranks are therefore disjoint within an epoch and all take
the same number of steps.

The order is a pure function of ``(seed, epoch)`` and the construction arguments, so the resume state is just
``(epoch, consumed_micro_batches)``: a run resumed from a checkpoint replays exactly the batches the uninterrupted
run would have seen next. Iterating the sampler never changes its state; the consumer (``TrainLoader``) records
consumption with ``advance()`` when a batch is handed to the training step, so prefetching cannot skew it.

End of epoch (``drop_last``):
- ``drop_last=True`` (default): the ``num_samples % G`` samples left over after the last full step are skipped
  for this epoch; which ones changes every epoch with the permutation.
- ``drop_last=False``: the permutation is extended cyclically from its start to a multiple of ``G`` (the
  ``torch.utils.data.DistributedSampler`` convention) so that every rank still takes the same number of steps.
  ``rank_repeat_mask`` marks those repeated slots; ``TrainLoader`` masks them out of every loss (labels -100, no
  alignment), so each sample counts exactly once per epoch, which keeps evaluation sums unbiased.

Length grouping (``group_by_length``): the permuted samples are cut into windows of ``group_window_steps`` global
steps, each window is sorted by length (longest first), cut into global steps, and the steps are shuffled. All
ranks thus see micro-batches of similar length at the same step (no rank waits on a long batch), dynamic padding
wastes little, and the step with the longest samples is moved to the front of the epoch so an out-of-memory
error shows up at the first step rather than hours in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from dskd_scale.data.dataset import DataError

__all__ = ["ResumableDistributedSampler", "stable_permutation"]

STATE_VERSION = 1
# Fields that fix the order of every epoch: a resume with any of them changed cannot replay the same order.
_ORDER_FIELDS = ("num_samples", "seed", "micro_batch_size", "world_size", "shuffle", "drop_last", "group_by_length")


_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def _splitmix64_int(x: int) -> int:
    z = (x + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stable_permutation(n: int, *key: int) -> np.ndarray:
    """A pseudo-random permutation of ``range(n)`` (int64) that depends only on ``key``.

    Index ``i`` sorts by ``splitmix64(k + i)``, ``k`` folding ``key`` through splitmix64. This is plain integer
    arithmetic (vectorised), so the order is the same on every platform and every numpy/torch version (numpy's
    Generator streams are not guaranteed stable across releases): a checkpoint resumes the same order after an
    environment upgrade.
    """
    seed = 0
    for part in key:
        seed = _splitmix64_int(seed ^ (int(part) & _MASK64))
    # uint64 array arithmetic wraps modulo 2**64, exactly as splitmix64 needs.
    z = np.arange(n, dtype=np.uint64) + np.uint64((seed + _GOLDEN_GAMMA) & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable").astype(np.int64)


class ResumableDistributedSampler:
    """Yields this rank's micro-batches (lists of sample indices) for the rest of the current epoch.

    Args:
        num_samples: dataset size; indices are drawn from ``range(num_samples)``.
        rank, world_size: this process's data-parallel rank and the data-parallel size.
        micro_batch_size: samples per micro-batch per rank.
        seed: order seed; epoch ``e`` is shuffled by ``(seed, e)``.
        shuffle: permute samples each epoch (else dataset order).
        drop_last: see the module docstring; ``False`` repeats a few samples to fill the last step.
        lengths: ``[num_samples]`` int token counts, required when ``group_by_length``.
        group_by_length: batch samples of similar length together (module docstring).
        group_window_steps: global steps per sorting window when grouping; larger groups tighter, shuffles less.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_by_length: bool = False,
        group_window_steps: int = 50,
    ):
        problems = []
        if world_size < 1:
            problems.append(f"world_size must be >= 1, got {world_size}")
        elif not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, world_size={world_size}), got {rank}")
        if micro_batch_size < 1:
            problems.append(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if group_window_steps < 1:
            problems.append(f"group_window_steps must be >= 1, got {group_window_steps}")
        if seed < 0:
            problems.append(f"seed must be >= 0, got {seed}")
        if num_samples < 1:
            problems.append(f"num_samples must be >= 1, got {num_samples} (the dataset is empty)")
        if group_by_length and lengths is None:
            problems.append("group_by_length=True needs lengths (one token count per sample)")
        if problems:
            raise DataError("invalid sampler arguments: " + "; ".join(problems))

        self.num_samples = int(num_samples)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.group_by_length = bool(group_by_length)
        self.group_window_steps = int(group_window_steps)
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None and self.lengths.shape != (self.num_samples,):
            raise DataError(f"lengths has shape {self.lengths.shape}, expected ({self.num_samples},)")

        self.samples_per_step = self.micro_batch_size * self.world_size
        full_steps, leftover = divmod(self.num_samples, self.samples_per_step)
        self.micro_batches_per_epoch = full_steps if self.drop_last else full_steps + (leftover > 0)
        if self.micro_batches_per_epoch == 0:
            raise DataError(
                f"the dataset has {self.num_samples} samples, fewer than one global step of micro_batch_size x "
                f"world_size = {self.micro_batch_size} x {self.world_size} = {self.samples_per_step} "
                "(use more data, a smaller micro batch, or drop_last=False)"
            )

        self.epoch = 0
        self.consumed_micro_batches = 0
        self._cached_epoch: int | None = None
        self._cached_rank_layout: tuple[np.ndarray, np.ndarray] | None = None

    # ---- order ---------------------------------------------------------------------------------------------

    def global_steps(self, epoch: int) -> np.ndarray:
        """All ranks' samples for ``epoch`` as ``[steps, world_size, micro_batch_size]`` int64 indices."""
        return self._layout(epoch)[0]

    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, is_repeat)``, both ``[steps, world_size, micro_batch_size]``, for ``epoch``."""
        order = (
            stable_permutation(self.num_samples, self.seed, epoch, 0) if self.shuffle else np.arange(self.num_samples)
        )
        used = self.micro_batches_per_epoch * self.samples_per_step
        # np.resize truncates (drop_last) or repeats cyclically from the start (padding) to exactly `used`.
        order = np.resize(order, used)
        is_repeat = np.arange(used) >= self.num_samples
        if self.group_by_length:
            slots = self._group_by_length(order, epoch)
            order, is_repeat = order[slots], is_repeat[slots]
        shape = (self.micro_batches_per_epoch, self.world_size, self.micro_batch_size)
        return order.reshape(shape), is_repeat.reshape(shape)

    def _group_by_length(self, order: np.ndarray, epoch: int) -> np.ndarray:
        """A permutation of the slots of ``order`` that groups similar lengths into global steps."""
        window = self.group_window_steps * self.samples_per_step
        window_id = np.arange(order.size) // window
        # lexsort: last key is primary. Sort by window, then longest first; ties keep the permuted order.
        steps = np.lexsort((-self.lengths[order], window_id)).reshape(-1, self.samples_per_step)
        if self.shuffle:
            steps = steps[stable_permutation(steps.shape[0], self.seed, epoch, 1)]
        longest = int(np.argmax(self.lengths[order[steps]].max(axis=1)))
        steps[[0, longest]] = steps[[longest, 0]]
        return steps.reshape(-1)

    def _rank_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached_epoch != epoch:
            indices, is_repeat = self._layout(epoch)
            self._cached_rank_layout = (
                np.ascontiguousarray(indices[:, self.rank]),
                np.ascontiguousarray(is_repeat[:, self.rank]),
            )
            self._cached_epoch = epoch
        return self._cached_rank_layout

    def rank_micro_batches(self, epoch: int) -> np.ndarray:
        """This rank's micro-batches for ``epoch``: ``[micro_batches_per_epoch, micro_batch_size]`` int64."""
        return self._rank_layout(epoch)[0]

    def rank_repeat_mask(self, epoch: int) -> np.ndarray:
        """``[micro_batches_per_epoch, micro_batch_size]`` bool, aligned with ``rank_micro_batches``: True where a
        slot repeats a sample only to fill the last step (``drop_last=False``); always False with ``drop_last``."""
        return self._rank_layout(epoch)[1]

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining micro-batches of the current epoch, from ``consumed_micro_batches`` on (state unchanged)."""
        batches = self.rank_micro_batches(self.epoch)
        for row in batches[self.consumed_micro_batches :]:
            yield row.tolist()

    def __len__(self) -> int:
        return self.micro_batches_per_epoch

    # ---- position ------------------------------------------------------------------------------------------

    @property
    def remaining_micro_batches(self) -> int:
        return self.micro_batches_per_epoch - self.consumed_micro_batches

    def advance(self, micro_batches: int = 1) -> None:
        """Record that ``micro_batches`` more micro-batches of the current epoch reached the training step."""
        if micro_batches < 0 or self.consumed_micro_batches + micro_batches > self.micro_batches_per_epoch:
            raise ValueError(
                f"cannot advance by {micro_batches}: {self.consumed_micro_batches} of "
                f"{self.micro_batches_per_epoch} micro-batches of epoch {self.epoch} already consumed"
            )
        self.consumed_micro_batches += micro_batches

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first micro-batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        self.consumed_micro_batches = 0

    # ---- checkpoint ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Position plus the arguments that fix the order (checked on load). Plain ints/bools: JSON-safe."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed_micro_batches": self.consumed_micro_batches,
            "consumed_samples": self.consumed_micro_batches * self.samples_per_step,
            **{name: getattr(self, name) for name in _ORDER_FIELDS},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``'s position; refuses a state whose order-defining fields differ from this sampler.

        Raises:
            DataError: naming every mismatched or missing field (e.g. a changed seed or world size, which would
                replay a different order and silently repeat or skip samples).
        """
        required = ("version", "epoch", "consumed_micro_batches", *_ORDER_FIELDS)
        missing = [name for name in required if name not in state]
        if missing:
            raise DataError(f"sampler state is missing field(s) {missing}; it was not written by this sampler")
        if state["version"] != STATE_VERSION:
            raise DataError(f"sampler state field 'version' is {state['version']}, this code reads {STATE_VERSION}")
        mismatched = [
            f"'{name}' was {state[name]!r} in the checkpoint but is {getattr(self, name)!r} now"
            for name in _ORDER_FIELDS
            if state[name] != getattr(self, name)
        ]
        if mismatched:
            raise DataError(
                "cannot resume the data order exactly: sampler field " + "; ".join(mismatched) + ". Resume with "
                "the same data, seed, micro batch size, data-parallel size and sampling options"
            )
        consumed = int(state["consumed_micro_batches"])
        if not 0 <= consumed <= self.micro_batches_per_epoch:
            raise DataError(
                f"sampler state field 'consumed_micro_batches' is {consumed}, outside [0, "
                f"{self.micro_batches_per_epoch}]"
            )
        self.set_epoch(int(state["epoch"]))
        self.consumed_micro_batches = consumed
