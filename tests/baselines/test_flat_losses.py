"""SFT, vanilla KD, ULD and MinED losses on tiny tensors: golden values computed here, chunking, masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dskd_scale.losses.baselines import (
    check_same_vocabulary,
    mined_kd_loss,
    sft_loss,
    sorted_probability_l1,
    uld_loss,
    uld_pairs,
    vanilla_kd_loss,
)
from dskd_scale.losses.divergences import DivergenceParams


def head(in_dim: int, rows: int, seed: int, *, trainable: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    module = torch.nn.Linear(in_dim, rows, bias=False).double()
    module.weight.requires_grad_(trainable)
    return module


def leaf(*shape: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def run(loss_fn, hidden, student_head, term="kd"):
    """Loss value and the gradients it sends to the hidden states and the student head."""
    hidden.grad, student_head.weight.grad = None, None
    total = loss_fn()[term][0]
    total.backward()
    return total.detach().clone(), hidden.grad.clone(), student_head.weight.grad.clone()


def test_sft_is_cross_entropy_and_ignores_masked_labels():
    student_head = head(4, 7, 0)
    hidden = leaf(5, 4, seed=1)
    labels = torch.tensor([1, -100, 6, 0, 3])
    terms = sft_loss(hidden, labels, student_head=student_head, chunk_size=2)
    expected = F.cross_entropy(student_head(hidden), labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(terms["ce"][0], expected)
    assert int(terms["ce"][1]) == 4


def test_vanilla_kd_golden_compares_only_tokenizer_rows():
    vocab, student_rows, teacher_rows = 6, 8, 9  # both heads padded past the tokenizer, by different amounts
    student_head, teacher_head = head(3, student_rows, 0), head(5, teacher_rows, 1, trainable=False)
    student_h, teacher_h = leaf(7, 3, seed=2), leaf(7, 5, seed=3).detach()
    params = DivergenceParams(temperature=2.0)

    def loss(chunk=3):
        return vanilla_kd_loss(
            student_h,
            teacher_h,
            student_head=student_head,
            teacher_head=teacher_head,
            vocab_size=vocab,
            params=params,
            chunk_size=chunk,
        )

    value, grad_h, grad_w = run(loss, student_h, student_head)
    with torch.no_grad():  # independent golden value: KL(p || q) on the first `vocab` logits at temperature 2
        p = torch.softmax(teacher_head(teacher_h)[:, :vocab] / 2, -1)
        log_q = torch.log_softmax(student_head(student_h)[:, :vocab] / 2, -1)
        expected = (p * (p.log() - log_q)).sum()
    torch.testing.assert_close(value, expected)
    assert int(loss()["kd"][1]) == 7

    with torch.no_grad():  # padded head rows may hold anything: no influence on value or gradient
        student_head.weight[vocab:] = 100.0
        teacher_head.weight[vocab:] = -50.0
    value2, grad_h2, grad_w2 = run(loss, student_h, student_head)
    torch.testing.assert_close(value2, value)
    torch.testing.assert_close(grad_h2, grad_h)
    assert torch.all(grad_w2[vocab:] == 0)

    value3, grad_h3, grad_w3 = run(lambda: loss(chunk=100), student_h, student_head)  # unchunked
    torch.testing.assert_close(value3, value2)
    torch.testing.assert_close(grad_h3, grad_h2)
    torch.testing.assert_close(grad_w3, grad_w2)


def test_vanilla_kd_refuses_different_tokenizers():
    assert check_same_vocabulary(50257, 50257) == 50257
    with pytest.raises(ValueError, match="uld or mined"):
        check_same_vocabulary(50257, 32000)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        vanilla_kd_loss(
            leaf(2, 3, seed=0),
            leaf(2, 3, seed=1),
            student_head=head(3, 4, 0),
            teacher_head=head(3, 9, 1),
            vocab_size=5,
            chunk_size=2,
        )


def reference_uld(student_logits: np.ndarray, teacher_logits: np.ndarray) -> float:
    """Anchor recipe: softmax, sort descending, zero-pad to the larger vocabulary, L1, sum over rows."""

    def probs(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return -np.sort(-(e / e.sum(-1, keepdims=True)), axis=-1)

    ps, pt = probs(student_logits), probs(teacher_logits)
    width = max(ps.shape[1], pt.shape[1])
    ps = np.pad(ps, ((0, 0), (0, width - ps.shape[1])))
    pt = np.pad(pt, ((0, 0), (0, width - pt.shape[1])))
    return float(np.abs(ps - pt).sum())


def test_uld_golden_symmetry_zero_and_chunking():
    student_head, teacher_head = head(3, 7, 0), head(4, 12, 1, trainable=False)
    student_h, teacher_h = leaf(5, 3, seed=2), leaf(5, 4, seed=3).detach()

    def loss(chunk=2, s_vocab=5, t_vocab=11):
        return uld_loss(
            student_h,
            teacher_h,
            student_head=student_head,
            teacher_head=teacher_head,
            student_vocab_size=s_vocab,
            teacher_vocab_size=t_vocab,
            chunk_size=chunk,
        )

    value, grad_h, grad_w = run(loss, student_h, student_head)
    with torch.no_grad():
        expected = reference_uld(student_head(student_h)[:, :5].numpy(), teacher_head(teacher_h)[:, :11].numpy())
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value1, grad_h1, grad_w1 = run(lambda: loss(chunk=100), student_h, student_head)
    torch.testing.assert_close(value1, value)
    torch.testing.assert_close(grad_h1, grad_h)
    torch.testing.assert_close(grad_w1, grad_w)

    # Through the chunked loss: swapping the two sides of every pair gives the same value; identical sides give 0.
    swapped = uld_loss(
        teacher_h,
        student_h.detach(),
        student_head=teacher_head,
        teacher_head=student_head,
        student_vocab_size=11,
        teacher_vocab_size=5,
        chunk_size=2,
    )["kd"][0]
    torch.testing.assert_close(swapped, value)
    same = uld_loss(
        student_h,
        student_h.detach(),
        student_head=student_head,
        teacher_head=student_head,
        student_vocab_size=5,
        teacher_vocab_size=5,
        chunk_size=2,
    )["kd"][0]
    assert same.item() == 0.0

    a, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(sorted_probability_l1(a, b), sorted_probability_l1(b, a))  # symmetric in the pair
    shuffled = a[:, torch.randperm(6)]  # sorting forgets token identity: a permuted vocabulary is a perfect match
    assert torch.allclose(sorted_probability_l1(a, shuffled), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert sorted_probability_l1(a, a).abs().max() == 0


def test_uld_pairs_kth_response_tokens_and_swap():
    student_labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 3, 4, -100, -100, -100]])
    teacher_labels = torch.tensor([[-100, 8, 9, -100], [-100, -100, 1, 2]])
    batch, student_row, teacher_row = uld_pairs(student_labels, teacher_labels)
    # example 0: 3 student vs 2 teacher response tokens -> 2 pairs; example 1: 2 vs 2.
    assert batch.tolist() == [0, 0, 1, 1]
    assert student_row.tolist() == [1, 2, 0, 1]  # rows s - 1 of labels at s = 2, 3 and 1, 2
    assert teacher_row.tolist() == [0, 1, 1, 2]
    swapped = uld_pairs(teacher_labels, student_labels)
    assert swapped[1].tolist() == teacher_row.tolist() and swapped[2].tolist() == student_row.tolist()


def test_mined_loss_golden_aligned_rows_use_mapped_teacher_others_gold():
    student_rows, teacher_rows = 6, 5
    student_to_teacher = torch.tensor([2, -1, 0, 4, -1])  # len(student tokenizer) = 5 < 6 head rows
    student_head, teacher_head = head(3, student_rows, 0), head(4, teacher_rows, 1, trainable=False)
    student_h, teacher_h = leaf(4, 3, seed=2), leaf(4, 4, seed=3).detach()
    labels = torch.tensor([3, 0, 2, 4])
    aligned = torch.tensor([True, False, True, False])
    params = DivergenceParams(temperature=2.0)

    def loss(chunk=3):
        return mined_kd_loss(
            student_h,
            teacher_h,
            labels,
            aligned,
            student_head=student_head,
            teacher_head=teacher_head,
            student_to_teacher_ids=student_to_teacher,
            params=params,
            chunk_size=chunk,
        )

    value, grad_h, grad_w = run(loss, student_h, student_head)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_h)
        log_q = torch.log_softmax(student_head(student_h) / 2, -1)
        expected = 0.0
        for n in range(4):
            if aligned[n]:
                mapped = [v for v in range(5) if student_to_teacher[v] >= 0]
                z = teacher_logits[n, [int(student_to_teacher[v]) for v in mapped]] / 2
                p = torch.softmax(z, -1)
                expected += float((p * (p.log() - log_q[n, mapped])).sum())
            else:
                expected += float(-log_q[n, labels[n]])  # one-hot gold target: CE at the temperature
    assert value.item() == pytest.approx(expected, rel=1e-10)
    terms = loss()
    assert int(terms["kd"][1]) == 4 and int(terms["mined_aligned"][0]) == 2
    value1, grad_h1, grad_w1 = run(lambda: loss(chunk=100), student_h, student_head)
    torch.testing.assert_close(value1, value)
    torch.testing.assert_close(grad_h1, grad_h)
    torch.testing.assert_close(grad_w1, grad_w)
    with torch.no_grad():  # a non-aligned row's teacher input is never read
        teacher_h[1] = 1e6
    torch.testing.assert_close(run(loss, student_h, student_head)[0], value)


def _baseline_losses(student_h, teacher_h, student_head, teacher_head, grad_weight):
    """vanilla KD, ULD and MinED over the same rows (7 rows, chunks of 3), each as {"kd": (sum, count)}."""
    labels = torch.tensor([3, 0, 2, 4, 1, 5, 2])
    aligned = torch.tensor([True, False, True, True, False, True, True])
    params = DivergenceParams(temperature=2.0)
    common = dict(student_head=student_head, teacher_head=teacher_head, chunk_size=3, grad_weight=grad_weight)
    return {
        "vanilla_kd": lambda: vanilla_kd_loss(student_h, teacher_h, vocab_size=6, params=params, **common),
        "uld": lambda: uld_loss(student_h, teacher_h, student_vocab_size=6, teacher_vocab_size=8, **common),
        "mined": lambda: mined_kd_loss(
            student_h, teacher_h, labels, aligned, student_to_teacher_ids=torch.tensor([2, -1, 0, 4, -1, 7]),
            params=params, **common
        ),
    }


@pytest.mark.parametrize("criterion", ["vanilla_kd", "uld", "mined"])
@pytest.mark.parametrize("weight_known", [True, False])
def test_fused_trainable_head_gives_the_autograd_head_loss_and_gradients(criterion, weight_known):
    """A TrainableHead (weight gradient accumulated in the forward on row blocks, no recomputation when the
    expected weight is right; recomputed when it is unknown) equals a plain autograd head, in fp64."""
    from dskd_scale.losses import TrainableHead

    weight_loss = 0.37  # the caller's d(total)/d(sum), as reduce.term_weights would give it
    plain_head, teacher_head = head(3, 8, 0), head(4, 9, 1, trainable=False)  # heads padded past the tokenizers
    student_h, teacher_h = leaf(7, 3, seed=2), leaf(7, 4, seed=3).detach()
    plain_value, plain_grad_h, plain_grad_w = run(
        _baseline_losses(student_h, teacher_h, plain_head, teacher_head, 0.0)[criterion], student_h, plain_head
    )
    plain_grad_h, plain_grad_w = plain_grad_h * weight_loss, plain_grad_w * weight_loss

    fused_head = TrainableHead(plain_head.weight.detach().clone())
    head_calls = []
    logits = fused_head.logits
    fused_head.logits = lambda hidden: head_calls.append(hidden.shape[0]) or logits(hidden)
    student_h.grad = None
    losses = _baseline_losses(student_h, teacher_h, fused_head, teacher_head, weight_loss if weight_known else 0.0)
    value = losses[criterion]()["kd"][0]
    (weight_loss * value).backward()
    torch.testing.assert_close(value.detach(), plain_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student_h.grad, plain_grad_h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused_head.take_gradient(), plain_grad_w, rtol=1e-10, atol=1e-12)
    # One head pass per chunk of 3 rows; a second one in the backward only when the weight was not known.
    assert sorted(head_calls) == sorted([3, 3, 1] * (1 if weight_known else 2))
