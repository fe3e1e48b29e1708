"""Projector maths: exact logit identity when representable, least-squares optimality, fp32, s2t rebuild."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from tolerance import reduction_tolerance

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
    expected = teacher_hidden @ teacher_rows.T
    # fp32 storage of P (relative rounding x cond(W_s^O)) then two fp32 matmuls of lengths E and D.
    condition = float(torch.linalg.cond(student_rows.double()))
    tol = reduction_tolerance(torch.float32, (E + D) * condition, scale=float(expected.abs().max()))
    torch.testing.assert_close(projected_logits, expected, **tol)
    assert projector.weight.dtype == torch.float32


def test_ideal_init_is_least_squares_optimal_otherwise():
    gen = torch.Generator().manual_seed(1)
    student_rows, teacher_rows = torch.randn(OVERLAP, D, generator=gen), torch.randn(OVERLAP, E, generator=gen)
    initial = ideal_t2s_init(student_rows, teacher_rows)
    residual = teacher_rows.double() - student_rows.double() @ initial.double()
    # Normal equations: the residual is orthogonal to the student head's column space (up to the fp32
    # storage of P: |W^T W dP| <= eps32 * ||W||^2 ||P|| per entry).
    bound = torch.finfo(torch.float32).eps * float(student_rows.norm() ** 2 * initial.norm())
    assert float((student_rows.double().T @ residual).abs().max()) <= bound
    best = torch.linalg.matrix_norm(residual)
    for _ in range(5):
        perturbed = initial + 1e-2 * torch.randn(D, E, generator=gen)
        assert torch.linalg.matrix_norm(teacher_rows - student_rows @ perturbed) > best
    # Agrees with an fp64 least-squares solve done independently, to the fp32 rounding of the stored result.
    reference = torch.linalg.lstsq(student_rows.double(), teacher_rows.double()).solution
    torch.testing.assert_close(initial.double(), reference, **reduction_tolerance(torch.float32, 2))


def test_pinv_maths_runs_in_fp32_from_bf16_heads():
    gen = torch.Generator().manual_seed(2)
    student_rows = torch.randn(OVERLAP, D, generator=gen).bfloat16()
    teacher_rows = torch.randn(OVERLAP, E, generator=gen).bfloat16()
    initial = ideal_t2s_init(student_rows, teacher_rows)
    pinv = teacher_head_pinv(teacher_rows)
    assert initial.dtype == torch.float32 and pinv.dtype == torch.float32
    reference = torch.linalg.lstsq(student_rows.double(), teacher_rows.double()).solution
    torch.testing.assert_close(initial.double(), reference, **reduction_tolerance(torch.float32, 2))
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
    expected = hidden @ padded_student_head[overlap_ids].T
    # fp32 pinv storage (x cond(W_t^O)), the rebuild's length-O product, two more matmuls (D, E).
    condition = float(torch.linalg.cond(teacher_rows.double()))
    tol = reduction_tolerance(torch.float32, (OVERLAP + D + E) * condition, scale=float(expected.abs().max()))
    torch.testing.assert_close(s2t(hidden) @ teacher_rows.T, expected, **tol)
    # After the student head changes, rebuild() follows it.
    new_head = padded_student_head.clone()
    new_head[overlap_ids] = teacher_rows @ torch.randn(E, D, generator=gen)
    s2t.rebuild(new_head)
    expected = hidden @ new_head[overlap_ids].T
    tol = reduction_tolerance(torch.float32, (OVERLAP + D + E) * condition, scale=float(expected.abs().max()))
    torch.testing.assert_close(s2t(hidden) @ teacher_rows.T, expected, **tol)
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


def test_pinv_least_squares_at_realistic_overlap_size():
    """50k overlap rows (real overlaps are 20k-150k): the fp64 pinv keeps every direction of the head.

    In fp32, ``torch.linalg.pinv``'s default cut-off (eps32 * max(rows, cols) ~ 0.6 % at 50k rows) drops the
    weak singular directions; the head here has singular values spread over 4 decades, so an fp32 pinv
    would violate the normal equations by orders of magnitude more than the fp64 bound checked here.
    """
    rows, cols = 50_000, 64
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    singular = torch.logspace(0, -4, cols, dtype=torch.float64)  # condition number 1e4
    rotation, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    student_rows = ((basis * singular) @ rotation).float()  # what a head gives us: fp32 rows
    teacher_rows = torch.randn(rows, 8, generator=gen)
    start = time.perf_counter()
    initial = ideal_t2s_init(student_rows, teacher_rows).double()
    pinv = teacher_head_pinv(student_rows).double()  # the same routine on a [O, 64] head
    elapsed = time.perf_counter() - start
    a, b = student_rows.double(), teacher_rows.double()
    residual = b - a @ initial
    # Normal equations A^T (B - A P) = 0. P is stored in fp32 after an fp64 solve, so the bound is the
    # fp32 rounding of P seen through A^T A: |A^T A dP| <= eps32 * ||A||_2^2 * ||P||_F, plus fp64 terms.
    bound = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(a, 2) ** 2 * initial.norm())
    assert float((a.T @ residual).abs().max()) <= bound
    # Residual orthogonal to the column space: its projection onto col(A) is as small as that rounding.
    projection = basis.T @ residual
    assert float(projection.abs().max()) <= bound / float(singular.min())
    # pinv property: A pinv(A) A = A (every direction kept; a cut-off at 2 % would lose half of them).
    reconstructed = a @ (pinv @ a)
    relative = float((reconstructed - a).norm() / a.norm())
    assert relative <= torch.finfo(torch.float32).eps * float(singular.max() / singular.min()), relative
    fp32_pinv = torch.linalg.pinv(student_rows)  # what the code did before: loses the weak directions
    fp32_relative = float((a @ (fp32_pinv.double() @ a) - a).norm() / a.norm())
    assert fp32_relative > 100 * relative, "the test must be able to tell an fp32 cut-off from fp64"
    assert elapsed < 60, f"fp64 pinv of a 50k x 64 head took {elapsed:.1f} s"
