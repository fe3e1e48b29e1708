"""Baseline dispatch on a Contract 2 batch: every term present, counts known before the forward match the terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dskd_scale.alignment.mined import MinedMap
from dskd_scale.config.run import KDConfig
from dskd_scale.losses.baselines import (
    BASELINES,
    KD_TERMS,
    BaselineResources,
    build_cma_projectors,
    criterion_terms,
    local_counts,
    mined_teacher_rows,
)

V, W, D, E = 6, 5, 4, 3
STUDENT_BYTES = [None, b"a", b"b", b"ab", b"c", None]  # ids 0 and 5 are special (BOS, EOS)
TEACHER_BYTES = [b"a", b"b", b"c", None, b"ba"]  # id 3 is EOS


def batch():
    return {
        "student_input_ids": torch.tensor([[0, 1, 3, 4, 5], [0, 2, 1, 5, 5]]),
        "student_labels": torch.tensor([[-100, -100, 3, 4, 5], [-100, 2, 1, 5, -100]]),
        "teacher_input_ids": torch.tensor([[0, 0, 1, 2, 3, 3], [1, 0, 3, 3, 3, 3]]),
        "teacher_labels": torch.tensor([[-100, -100, 1, 2, 3, -100], [-100, 0, 3, -100, -100, -100]]),
        "align_batch": torch.tensor([0, 0, 1]),
        "align_student": torch.tensor([3, 4, 3]),
        "align_teacher": torch.tensor([3, 4, 2]),
    }


def resources():
    torch.manual_seed(0)
    mined = MinedMap(
        teacher_to_student=np.array([1, 2, 4, 5, 2]),
        teacher_distance=np.array([0, 0, 0, 0, 1]),
        student_to_teacher=np.array([-1, 0, 1, -1, 2, 3]),
        teacher_token_bytes=TEACHER_BYTES,
        student_token_bytes=STUDENT_BYTES,
    )
    student_embed, teacher_embed = torch.nn.Embedding(V, D), torch.nn.Embedding(W, E)
    return BaselineResources(
        student_vocab_size=V,
        teacher_vocab_size=W,
        mined=mined,
        cma_projectors=build_cma_projectors(D, E, D, E),
        student_embed=student_embed,
        teacher_embed=teacher_embed,
    )


@pytest.mark.parametrize("criterion", BASELINES)
def test_terms_and_pre_forward_counts_agree(criterion):
    torch.manual_seed(1)
    data = batch()
    student_head, teacher_head = torch.nn.Linear(D, V + 2, bias=False), torch.nn.Linear(E, W + 1, bias=False)
    student_hidden = torch.randn(2, 5, D, requires_grad=True)
    teacher_hidden = torch.randn(2, 6, E)
    if criterion == "vanilla_kd":  # same tokenizer on both sides
        teacher_head, teacher_hidden = torch.nn.Linear(D, V + 1, bias=False), torch.randn(2, 5, D)
    extra = resources()
    if criterion == "vanilla_kd":
        extra.teacher_vocab_size = V
    extra.student_head_frozen = lambda h: F.linear(h, student_head.weight.detach())
    student_a = student_hidden[data["align_batch"], data["align_student"] - 1]
    teacher_a = teacher_hidden[data["align_batch"], data["align_teacher"] - 1]
    kd = KDConfig(criterion=criterion, chunk_size=2)
    terms = criterion_terms(
        criterion,
        kd=kd,
        rows=None,
        student_hidden_BSD=student_hidden,
        teacher_hidden_BTE=teacher_hidden,
        student_AD=student_a,
        teacher_AE=teacher_a,
        student_head=student_head,
        teacher_head=teacher_head,
        batch=data,
        resources=extra,
    )
    counts = local_counts(criterion, data)
    assert set(counts) == set(terms)
    assert all(int(terms[name][1]) == counts[name] for name in counts), (terms, counts)
    assert set(KD_TERMS[criterion]) <= set(terms) and counts["ce"] == 6
    sum(terms[name][0] for name in ("ce", *KD_TERMS[criterion])).backward()
    assert student_hidden.grad.abs().sum() > 0


def test_missing_resources_are_named():
    data = batch()
    with pytest.raises(ValueError, match="mined"):
        BaselineResources(student_vocab_size=V, teacher_vocab_size=W).require("mined", "mined")
    with pytest.raises(ValueError, match="unknown baseline"):
        local_counts("dskd_typo", data)


def test_mined_rows_online_equal_precomputed_pairs():
    data = batch()
    label_batch, label_pos = torch.nonzero(data["student_labels"][:, 1:] != -100, as_tuple=True)
    online = mined_teacher_rows(label_batch, label_pos, data, resources().mined)
    # Example 0: student "ab" "c" EOS vs teacher "a" "b" "c" EOS... response tokens: student [ab, c, EOS],
    # teacher [b, c, EOS]; "ab" pairs with "b" (cost 1) but the map sends "b" to "b", not "ab": unaligned.
    # Example 1: student [b, a, EOS] vs teacher [a, EOS]: DTW gives b->a, a->a, EOS->EOS; the map allows a->a, EOS.
    assert online.tolist() == [-1, 2, 3, -1, 0, 1]
    stored = dict(
        data,
        mined_align_batch=torch.tensor([0, 0, 1, 1]),
        mined_align_student=torch.tensor([3, 4, 2, 3]),
        mined_align_teacher=torch.tensor([3, 4, 1, 2]),
    )
    assert mined_teacher_rows(label_batch, label_pos, stored, resources().mined).tolist() == online.tolist()
    bad = dict(stored, mined_align_student=torch.tensor([1, 4, 2, 3]))  # position 1 is a prompt token
    with pytest.raises(ValueError, match="not a label row"):
        mined_teacher_rows(label_batch, label_pos, bad, resources().mined)
