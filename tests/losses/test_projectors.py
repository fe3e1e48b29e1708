"""Projector maths: exact logit identity when representable, least-squares optimality, fp32, s2t rebuild."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dskd_scale.losses import DSKDOptions, dskd_loss
from dskd_scale.projectors import LearnedS2TMap, PinvS2TMap, T2SProjector, ideal_t2s_init, teacher_head_pinv

OVERLAP, D, E = 40, 6, 9


def test_ideal_init_reproduces_teacher_logits_when_representable():
    """W_t^O = W_s^O M (teacher rows inside the student head's column space): t2s logits equal teacher's."""
    gen = torch.Generator().manual_seed(0)
    student_rows = torch.randn(OVERLAP, D, generator=gen)
    mixing = torch.randn(D, E, generator=gen)
    teacher_rows = student_rows @ mixing
    projector = T2SProjector(E, D).init_ideal_(student_rows, teacher_rows)
    teacher_hidden = torch.randn(5, E, generator=gen)
    projected_logits = projector(teacher_hidden) @ student_rows.T
    torch.testing.assert_close(projected_logits, teacher_hidden @ teacher_rows.T, rtol=1e-4, atol=1e-4)
    assert projector.weight.dtype == torch.float32


def test_ideal_init_is_least_squares_optimal_otherwise():
    gen = torch.Generator().manual_seed(1)
    student_rows, teacher_rows = torch.randn(OVERLAP, D, generator=gen), torch.randn(OVERLAP, E, generator=gen)
    initial = ideal_t2s_init(student_rows, teacher_rows)
    residual = teacher_rows - student_rows @ initial
    # Normal equations: the residual is orthogonal to the student head's column space.
    torch.testing.assert_close(student_rows.T @ residual, torch.zeros(D, E), atol=1e-4, rtol=0)
    best = torch.linalg.matrix_norm(residual)
    for _ in range(5):
        perturbed = initial + 1e-2 * torch.randn(D, E, generator=gen)
        assert torch.linalg.matrix_norm(teacher_rows - student_rows @ perturbed) > best
    # Agrees with an fp64 least-squares solve done independently.
    reference = torch.linalg.lstsq(student_rows.double(), teacher_rows.double()).solution
    torch.testing.assert_close(initial.double(), reference, atol=1e-4, rtol=1e-4)


def test_pinv_maths_runs_in_fp32_from_bf16_heads():
    gen = torch.Generator().manual_seed(2)
    student_rows = torch.randn(OVERLAP, D, generator=gen).bfloat16()
    teacher_rows = torch.randn(OVERLAP, E, generator=gen).bfloat16()
    initial = ideal_t2s_init(student_rows, teacher_rows)
    pinv = teacher_head_pinv(teacher_rows)
    assert initial.dtype == torch.float32 and pinv.dtype == torch.float32
    reference = torch.linalg.pinv(student_rows.double()) @ teacher_rows.double()
    torch.testing.assert_close(initial.double(), reference, atol=1e-4, rtol=1e-4)
    s2t = PinvS2TMap(teacher_rows, torch.arange(OVERLAP))
    s2t.rebuild(student_rows)
    assert s2t.matrix_ED.dtype == torch.float32
    out = s2t(torch.randn(3, D).bfloat16())
    assert out.dtype == torch.bfloat16


def test_s2t_map_exact_when_representable_and_rebuilt_from_current_head():
    """Student rows in the teacher head's column space: s2t logits equal student logits on O."""
    gen = torch.Generator().manual_seed(3)
    teacher_rows = torch.randn(OVERLAP, E, generator=gen)
    padded_student_head = torch.randn(OVERLAP + 7, D, generator=gen)  # padded rows beyond the overlap ids
    overlap_ids = torch.randperm(OVERLAP + 7, generator=gen)[:OVERLAP]
    padded_student_head[overlap_ids] = teacher_rows @ torch.randn(E, D, generator=gen)
    s2t = PinvS2TMap(teacher_rows, overlap_ids)
    with pytest.raises(RuntimeError, match="rebuild"):
        s2t(torch.randn(2, D))
    s2t.rebuild(padded_student_head)
    hidden = torch.randn(4, D, generator=gen)
    torch.testing.assert_close(
        s2t(hidden) @ teacher_rows.T, hidden @ padded_student_head[overlap_ids].T, atol=1e-3, rtol=1e-4
    )
    # After the student head changes, rebuild() follows it.
    new_head = padded_student_head.clone()
    new_head[overlap_ids] = teacher_rows @ torch.randn(E, D, generator=gen)
    s2t.rebuild(new_head)
    torch.testing.assert_close(s2t(hidden) @ teacher_rows.T, hidden @ new_head[overlap_ids].T, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="outside the student head"):
        s2t.rebuild(new_head[:3])


def test_tied_embeddings_and_gradients():
    """A tied student (head weight == input embedding): the s2t term gives the tied weight gradient only
    through the input-embedding path, never through the map; a learned map gets gradient."""
    gen = torch.Generator().manual_seed(4)
    vocab, rows = 15, 8
    embedding = torch.nn.Embedding(vocab, D)
    teacher_weight = torch.randn(vocab, E, generator=gen)
    tokens = torch.randint(0, vocab, (rows,), generator=gen)
    overlap = torch.arange(vocab)
    for learned in (False, True):
        embedding.weight.grad = None
        hidden = torch.tanh(embedding(tokens))  # a one-layer "body" on the tied embedding
        if learned:
            s2t = LearnedS2TMap(D, E).init_pinv_(embedding.weight, teacher_weight)
        else:
            s2t = PinvS2TMap(teacher_weight, overlap)
            s2t.rebuild(embedding.weight)
        head = lambda h: F.linear(h, embedding.weight)  # noqa: E731
        out = dskd_loss(
            hidden,
            torch.randn(rows, E, generator=gen),
            student_head=head,
            student_head_frozen=lambda h: F.linear(h, embedding.weight.detach()),
            teacher_head=lambda h: F.linear(h, teacher_weight),
            t2s_projector=None,
            s2t_map=s2t,
            teacher_to_student_ids=overlap,
            options=DSKDOptions(spaces="teacher", chunk_size=3),
        )
        out["kd_s2t"][0].backward()
        grad = embedding.weight.grad
        # Only the rows of tokens that were looked up get gradient (through the embedding), none via the map.
        untouched = torch.ones(vocab, dtype=torch.bool)
        untouched[tokens] = False
        assert grad[untouched].abs().sum() == 0 and grad[tokens].abs().sum() > 0
        if learned:
            assert s2t.weight.grad is not None and s2t.weight.grad.abs().sum() > 0


def test_shape_errors():
    with pytest.raises(ValueError, match="paired one to one"):
        ideal_t2s_init(torch.randn(5, D), torch.randn(6, E))
    with pytest.raises(ValueError, match="overlap_student_ids must be"):
        PinvS2TMap(torch.randn(5, E), torch.arange(4))
    with pytest.raises(ValueError, match="projector weight"):
        T2SProjector(E, D).init_ideal_(torch.randn(5, E), torch.randn(5, D))
