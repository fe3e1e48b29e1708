"""build_train_loader: exact resume with prefetching workers, rank coverage, padding saved by length grouping."""

from __future__ import annotations

import itertools

import pytest
import torch

from dskd_scale.data import DataError, PrealignedDataset, build_train_loader


@pytest.fixture
def dataset(prealigned_dir, synthetic_rows, open_kw):
    return PrealignedDataset.open(prealigned_dir(synthetic_rows(90)), **open_kw)


def loader_for(dataset, rank=0, **kw):
    args = dict(rank=rank, world_size=2, micro_batch_size=4, seed=5, group_by_length=False)
    return build_train_loader(dataset, **{**args, **kw})


def take(loader, count):
    """``count`` batches' example indices, running into later epochs as a training loop would."""
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(batch["example_index"].tolist())
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("num_workers, group_by_length", [(0, False), (2, True)])
def test_checkpoint_after_step_k_resumes_with_batch_k_plus_1(dataset, num_workers, group_by_length):
    kw = dict(num_workers=num_workers, group_by_length=group_by_length)
    per_epoch = len(loader_for(dataset, **kw))  # 90 // 8 = 11
    total = 2 * per_epoch + 3
    reference = take(loader_for(dataset, **kw), total)
    # Mid-epoch, the last batch of an epoch, the first of the next, and inside the second epoch. Worker
    # processes start once per epoch pass (~0.5 s each here), so the worker case checks the two that matter most.
    stops = (3, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch) if num_workers == 0 else (3, per_epoch)
    for stop in stops:
        first = loader_for(dataset, **kw)
        head = take(first, stop)  # with workers, several batches beyond `stop` were already prefetched
        state = first.state_dict()
        resumed = loader_for(dataset, **kw)
        resumed.load_state_dict(state)
        assert head + take(resumed, total - stop) == reference, f"resume after {stop} batches"


def test_each_for_loop_is_one_epoch_and_epochs_reshuffle(dataset):
    loader = loader_for(dataset)
    epoch0 = [b["example_index"].tolist() for b in loader]
    assert loader.epoch == 1 and loader.consumed_micro_batches == 0
    epoch1 = [b["example_index"].tolist() for b in loader]
    assert len(epoch0) == len(epoch1) == len(loader) == 11 and epoch0 != epoch1
    partial = list(itertools.islice(loader, 4))
    assert loader.consumed_micro_batches == 4 and loader.state_dict()["consumed_micro_batches"] == 4
    rest = list(loader)
    assert len(partial) + len(rest) == 11


def test_ranks_take_disjoint_examples_and_equal_steps(dataset):
    per_rank = [
        [i for b in loader_for(dataset, rank=r, world_size=3) for i in b["example_index"].tolist()] for r in range(3)
    ]
    assert {len(examples) for examples in per_rank} == {(90 // 12) * 4}
    flat = [i for examples in per_rank for i in examples]
    assert len(flat) == len(set(flat)) == 84


def test_pads_from_manifest_eos_when_no_pad_token(dataset):
    batch = next(iter(loader_for(dataset)))
    mask = batch["student_attention_mask"].bool()
    assert (batch["student_input_ids"][~mask] == dataset.manifest["student_tokenizer"]["eos_token_id"]).all()


def test_refuses_a_state_from_another_seed(dataset):
    state = loader_for(dataset).state_dict()
    with pytest.raises(DataError, match="'seed' was 5"):
        loader_for(dataset, seed=6).load_state_dict(state)


def padded_fraction(loader) -> float:
    """Share of padding positions over both sides and all batches of one epoch."""
    real = padded = 0
    for batch in loader:
        for side in ("student", "teacher"):
            mask = batch[f"{side}_attention_mask"]
            real, padded = real + int(mask.sum()), padded + mask.numel()
    return 1 - real / padded


def test_length_grouping_reduces_padding(prealigned_dir, synthetic_rows, open_kw):
    ds = PrealignedDataset.open(prealigned_dir(synthetic_rows(400, min_len=4, max_len=120)), **open_kw)
    kw = dict(world_size=2, micro_batch_size=8)
    grouped = padded_fraction(loader_for(ds, group_by_length=True, **kw))
    random = padded_fraction(loader_for(ds, group_by_length=False, **kw))
    # Uniform lengths in [4, 120]: random batches of 8 pad ~40%; grouped ones only the teacher/student jitter.
    print(f"padded fraction: grouped {grouped:.3f}, random {random:.3f}")
    assert grouped < 0.1 < random, (grouped, random)


def test_unshuffled_full_pass_counts_every_example_once_across_ranks(dataset):
    """The eval setting (no shuffle, keep the remainder): repeated fill slots carry no labels or alignment."""
    counted, rows_seen = [], 0
    for r in range(3):
        for batch in loader_for(dataset, rank=r, world_size=3, shuffle=False, drop_last=False):
            live = (batch["student_labels"] != -100).any(1) | (batch["teacher_labels"] != -100).any(1)
            aligned_rows = set(batch["align_batch"].tolist())
            assert aligned_rows <= set(torch.nonzero(live).flatten().tolist())
            counted += batch["example_index"][live].tolist()
            rows_seen += len(live)
    assert rows_seen == 96  # ceil(90 / 12) steps x 12: every rank the same number of steps
    assert sorted(counted) == sorted(int(dataset[i]["example_index"]) for i in range(90))


def test_refuses_a_state_saved_on_other_data(dataset):
    train_a, _ = dataset.split_holdout(10, seed=0)
    train_b, _ = dataset.split_holdout(10, seed=1)  # same size, other examples: only the identity tells them apart
    state = loader_for(train_a).state_dict()
    loader_for(train_a).load_state_dict(state)
    with pytest.raises(DataError, match="'data_identity'"):
        loader_for(train_b).load_state_dict(state)
