"""ResumableDistributedSampler: determinism, rank disjointness/coverage, exact resume, length grouping."""

from __future__ import annotations

import numpy as np
import pytest

from dskd_scale.data import DataError, ResumableDistributedSampler
from dskd_scale.data.sampler import stable_permutation


def make(num_samples=103, *, rank=0, world_size=3, micro_batch_size=4, seed=11, **kw):
    return ResumableDistributedSampler(
        num_samples, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, seed=seed, **kw
    )


def consume(sampler, count):
    """Take ``count`` micro-batches the way the loader does (advance on hand-over, roll epochs over)."""
    taken = []
    while len(taken) < count:
        if sampler.remaining_micro_batches == 0:
            sampler.set_epoch(sampler.epoch + 1)
        for indices in sampler:
            taken.append(indices)
            sampler.advance(1)
            if len(taken) == count:
                break
    return taken


def test_order_is_a_function_of_seed_and_epoch():
    first, second = make(), make()
    assert list(first) == list(second)
    assert list(make(seed=12)) != list(first)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    first.set_epoch(0)
    assert list(first) == epoch0
    # Iterating does not move the position.
    assert list(first) == epoch0 and first.consumed_micro_batches == 0


@pytest.mark.parametrize("group_by_length", [False, True])
def test_ranks_are_disjoint_take_equal_steps_and_cover_all_but_the_remainder(group_by_length):
    world_size, mbs, n = 3, 4, 103
    lengths = np.random.default_rng(0).integers(1, 500, size=n)
    per_rank = [
        list(
            make(
                n, rank=r, world_size=world_size, micro_batch_size=mbs, lengths=lengths, group_by_length=group_by_length
            )
        )
        for r in range(world_size)
    ]
    assert {len(batches) for batches in per_rank} == {n // (world_size * mbs)}
    assert all(len(b) == mbs for batches in per_rank for b in batches)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == (n // 12) * 12  # disjoint; drop_last drops only the remainder (7)
    assert set(flat) <= set(range(n))


def test_drop_last_false_pads_cyclically_to_cover_every_sample():
    world_size, n = 3, 103
    per_rank = [list(make(n, rank=r, world_size=world_size, drop_last=False)) for r in range(world_size)]
    assert {len(batches) for batches in per_rank} == {9}  # ceil(103 / 12)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert set(flat) == set(range(n)) and len(flat) == 108


def test_dropped_remainder_changes_between_epochs():
    used = [set(make().global_steps(epoch).ravel().tolist()) for epoch in range(6)]
    assert all(len(u) == 96 for u in used) and len({frozenset(u) for u in used}) == 6
    assert set().union(*used) == set(range(103))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_at_every_point_equals_uninterrupted_order(group_by_length):
    lengths = np.random.default_rng(1).integers(1, 300, size=103)
    kw = dict(rank=1, lengths=lengths, group_by_length=group_by_length, group_window_steps=2)
    per_epoch = len(make(**kw))
    total = 3 * per_epoch + 2  # three epochs and a bit: covers mid-epoch stops and both epoch boundaries
    reference = consume(make(**kw), total)
    for stop in range(total + 1):
        first = make(**kw)
        head = consume(first, stop)
        resumed = make(**kw)
        resumed.load_state_dict(first.state_dict())
        assert head + consume(resumed, total - stop) == reference, f"resume after {stop} micro-batches"


def test_state_dict_reports_position_and_is_plain_data():
    sampler = make()
    consume(sampler, len(sampler) + 3)
    state = sampler.state_dict()
    assert (state["epoch"], state["consumed_micro_batches"], state["consumed_samples"]) == (1, 3, 3 * 12)
    assert all(isinstance(v, int | bool) for v in state.values())


@pytest.mark.parametrize(
    "field, changed",
    [
        ("seed", {"seed": 99}),
        ("world_size", {"world_size": 2, "rank": 0}),
        ("micro_batch_size", {"micro_batch_size": 2}),
        ("num_samples", {"num_samples": 104}),
    ],
)
def test_refuses_to_resume_with_a_different_order(field, changed):
    state = make().state_dict()
    with pytest.raises(DataError, match=rf"'{field}' was"):
        make(**changed).load_state_dict(state)


def test_refuses_bad_arguments():
    with pytest.raises(DataError, match="fewer than one global step"):
        make(num_samples=11)  # 3 ranks x 4 = 12
    with pytest.raises(DataError, match="rank must be"):
        make(rank=3)
    with pytest.raises(DataError, match="needs lengths"):
        make(group_by_length=True)


def padded_fraction(lengths, batches):
    real = sum(lengths[b].sum() for b in batches)
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1 - real / padded


def test_length_grouping_gives_similar_lengths_across_ranks_and_longest_step_first():
    lengths = np.random.default_rng(2).integers(1, 1000, size=600)
    kw = dict(num_samples=600, world_size=4, micro_batch_size=5, lengths=lengths, group_by_length=True)
    steps = make(**kw).global_steps(0)  # [steps, ranks, micro batch]
    step_lengths = lengths[steps.reshape(steps.shape[0], -1)]
    spread_grouped = (step_lengths.max(1) - step_lengths.min(1)).mean()
    random_steps = make(**{**kw, "group_by_length": False}).global_steps(0)
    random_lengths = lengths[random_steps.reshape(random_steps.shape[0], -1)]
    spread_random = (random_lengths.max(1) - random_lengths.min(1)).mean()
    assert spread_grouped < 0.1 * spread_random
    assert step_lengths[0].max() == lengths.max()
    # Grouped batches are not simply sorted: the step order is shuffled.
    step_max = step_lengths.max(1)
    assert not (np.all(np.diff(step_max[1:]) <= 0) or np.all(np.diff(step_max[1:]) >= 0))
    flat = [padded_fraction(lengths, make(**kw, rank=r)) for r in range(4)]
    assert max(flat) < 0.05 < padded_fraction(lengths, make(**{**kw, "group_by_length": False}))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_repeat_mask_marks_exactly_the_fill_slots(group_by_length):
    n, world_size = 103, 3
    lengths = np.random.default_rng(3).integers(1, 300, size=n)
    kw = dict(world_size=world_size, lengths=lengths, group_by_length=group_by_length)
    assert not make(**kw).rank_repeat_mask(0).any()  # drop_last=True never repeats
    counted = []
    for r in range(world_size):
        sampler = make(rank=r, drop_last=False, **kw)
        indices, repeats = sampler.rank_micro_batches(0), sampler.rank_repeat_mask(0)
        assert indices.shape == repeats.shape == (9, 4)
        counted += indices[~repeats].tolist()
    assert sorted(counted) == list(range(n))  # each sample counted once; 108 - 103 = 5 slots are repeats


def _splitmix64(x: int) -> int:
    """Reference splitmix64 (Steele, Lea, Flood 2014) in Python integers."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_epoch_order_is_plain_integer_hashing_not_a_library_rng_stream():
    """The order must survive numpy/torch upgrades between save and resume: recompute it in pure Python."""
    seed, epoch, n = 11, 3, 103
    key = 0
    for part in (seed, epoch, 0):
        key = _splitmix64(key ^ part)
    expected = sorted(range(n), key=lambda i: (_splitmix64((key + i) % 2**64), i))
    assert stable_permutation(n, seed, epoch, 0).tolist() == expected
    assert make(seed=seed, world_size=1, micro_batch_size=1).global_steps(epoch).ravel().tolist() == expected
    assert sorted(stable_permutation(10_000, 1, 2).tolist()) == list(range(10_000))
    # Not the identity, and not a near-identity: a shuffle moves almost everything.
    assert (stable_permutation(10_000, 1, 2) != np.arange(10_000)).mean() > 0.99
