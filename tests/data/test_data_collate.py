"""Collator: Contract 2 keys, dynamic padding to the longest row per side, alignment positions stay valid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dskd_scale.data import Collator, PrealignedDataset, pad_right

STUDENT_PAD, TEACHER_PAD = 7, 9


@pytest.fixture
def dataset(prealigned_dir, synthetic_rows, open_kw):
    return PrealignedDataset.open(prealigned_dir(synthetic_rows(40, min_len=3, max_len=50)), **open_kw)


def test_pad_right_scatters_rows_without_loss():
    rows = [np.array([1, 2, 3]), np.array([], dtype=np.int32), np.array([4])]
    padded, lengths = pad_right(rows, -1)
    np.testing.assert_array_equal(padded, [[1, 2, 3], [-1, -1, -1], [4, -1, -1]])
    np.testing.assert_array_equal(lengths, [3, 0, 1])


def test_batch_has_contract_keys_int64_and_pads_each_side_to_its_longest_row(dataset):
    indices = [3, 17, 5, 30, 8]
    examples = [dataset[i] for i in indices]
    batch = Collator(STUDENT_PAD, TEACHER_PAD)(examples)
    assert set(batch) == {
        *(f"{side}_{key}" for side in ("student", "teacher") for key in ("input_ids", "attention_mask", "labels")),
        "align_batch",
        "align_student",
        "align_teacher",
        "example_index",
        "num_examples",
    }
    assert all(t.dtype == torch.int64 for t in batch.values())
    assert int(batch["num_examples"]) == 5
    assert batch["example_index"].tolist() == [int(e["example_index"]) for e in examples]
    for side, pad in (("student", STUDENT_PAD), ("teacher", TEACHER_PAD)):
        lengths = [len(e[f"{side}_input_ids"]) for e in examples]
        ids, mask, labels = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        assert ids.shape == mask.shape == labels.shape == (5, max(lengths))  # dynamic, not a fixed max length
        assert mask.sum(1).tolist() == lengths
        for row, example in enumerate(examples):
            n = lengths[row]
            assert ids[row, :n].tolist() == example[f"{side}_input_ids"].tolist()
            assert labels[row, :n].tolist() == example[f"{side}_labels"].tolist()
            assert (ids[row, n:] == pad).all() and (labels[row, n:] == -100).all() and (mask[row, n:] == 0).all()
    # S and T are independent widths (the synthetic rows make them differ for this selection).
    assert batch["student_input_ids"].shape[1] != batch["teacher_input_ids"].shape[1]


def test_alignment_positions_point_at_the_same_tokens_as_in_the_shard(dataset):
    indices = list(range(0, 40, 3))
    examples = [dataset[i] for i in indices]
    batch = Collator(STUDENT_PAD, TEACHER_PAD)(examples)
    align_b = batch["align_batch"]
    assert align_b.numel() == sum(len(e["align_student"]) for e in examples) > 0
    assert torch.all(align_b[1:] >= align_b[:-1])
    for side in ("student", "teacher"):
        positions = batch[f"align_{side}"]
        tokens = batch[f"{side}_input_ids"][align_b, positions]
        expected = np.concatenate([e[f"{side}_input_ids"][e[f"align_{side}"]] for e in examples])
        assert tokens.tolist() == expected.tolist()
        assert (batch[f"{side}_attention_mask"][align_b, positions] == 1).all()
        assert (batch[f"{side}_labels"][align_b, positions] == tokens).all()  # aligned tokens are response labels


def test_rejects_bad_pad_ids_and_empty_batches():
    with pytest.raises(ValueError, match="pad ids"):
        Collator(-1, 0)
    with pytest.raises(ValueError, match="empty"):
        Collator(0, 0)([])


def test_repeat_rows_keep_their_shape_but_count_nothing(dataset):
    examples = [dataset[i] for i in (1, 2, 3)]
    plain = Collator(STUDENT_PAD, TEACHER_PAD)(examples)
    marked = Collator(STUDENT_PAD, TEACHER_PAD)([examples[0], {**examples[1], "is_repeat": True}, examples[2]])
    for side in ("student", "teacher"):
        assert torch.equal(marked[f"{side}_input_ids"], plain[f"{side}_input_ids"])
        assert (marked[f"{side}_labels"][1] == -100).all() and (plain[f"{side}_labels"][1] != -100).any()
        assert torch.equal(marked[f"{side}_labels"][[0, 2]], plain[f"{side}_labels"][[0, 2]])
        keep = plain["align_batch"] != 1
        assert torch.equal(marked[f"align_{side}"], plain[f"align_{side}"][keep])
    assert len(examples[1]["align_student"]) > 0 and 1 not in marked["align_batch"].tolist()
    assert (int(plain["num_examples"]), int(marked["num_examples"])) == (3, 2)
