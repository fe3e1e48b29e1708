"""DSKD v2 terms: naive-reference equality (values and gradients), gradient isolation, ETA id maps, edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from losses_reference import naive_dskd

from dskd_scale.losses import LOSS_TERMS, DSKDOptions, dskd_loss, student_ce
from dskd_scale.projectors import LearnedS2TMap, PinvS2TMap, T2SProjector

A, D, E, V, W = 10, 6, 8, 17, 19


class Setup:
    """Tiny student/teacher heads, hidden rows, projector and s2t map; the teacher weight requires grad
    on purpose, so any gradient leaking into it would show up in ``.grad``."""

    def __init__(self, seed: int = 0, *, learned_s2t: bool = False, dtype=torch.float32, vocab_pad: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.student_weight = torch.nn.Parameter(torch.randn(V, D, generator=gen).to(dtype))
        self.teacher_weight = torch.nn.Parameter(torch.randn(W + vocab_pad, E, generator=gen).to(dtype))
        self.student_hidden = torch.randn(A, D, generator=gen).to(dtype).requires_grad_(True)
        self.teacher_hidden = torch.randn(A, E, generator=gen).to(dtype)
        self.id_map = torch.arange(W) % V  # a many-to-one but valid map into the student vocabulary
        self.id_map[3] = -1
        overlap = torch.arange(12)
        self.projector = T2SProjector(E, D).to(dtype)
        self.projector.init_ideal_(self.student_weight[overlap], self.teacher_weight[overlap])
        if learned_s2t:
            self.s2t = LearnedS2TMap(D, E).to(dtype)
        else:
            self.s2t = PinvS2TMap(self.teacher_weight[overlap], overlap)
            self.s2t.rebuild(self.student_weight)
        self.labels = torch.randint(0, V, (A,), generator=gen)
        self.labels[[0, 4]] = -100

    def run(self, **option_overrides):
        labels = option_overrides.pop("labels", self.labels)
        options = DSKDOptions(**{"chunk_size": 3, **option_overrides})
        return dskd_loss(
            self.student_hidden,
            self.teacher_hidden,
            student_head=lambda h: F.linear(h, self.student_weight),
            student_head_frozen=lambda h: F.linear(h, self.student_weight.detach()),
            teacher_head=lambda h: F.linear(h, self.teacher_weight.detach()),
            t2s_projector=self.projector,
            s2t_map=self.s2t,
            teacher_to_student_ids=self.id_map,
            options=options,
            student_labels_A=labels,
        )

    def naive(self, **kw):
        return naive_dskd(
            self.student_hidden,
            self.teacher_hidden,
            self.student_weight,
            self.teacher_weight,
            self.projector.weight,
            self.s2t,
            self.id_map,
            labels=self.labels,
            **kw,
        )

    def grads(self):
        tensors = [self.student_hidden, self.student_weight, self.projector.weight, self.teacher_weight]
        if isinstance(self.s2t, LearnedS2TMap):
            tensors.append(self.s2t.weight)
        out = [None if t.grad is None else t.grad.clone() for t in tensors]
        for t in tensors:
            t.grad = None
        return out


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("learned_s2t", [False, True])
@pytest.mark.parametrize("agreement_mask", [True, False])
def test_matches_naive_reference(chunk_size, learned_s2t, agreement_mask):
    setup = Setup(learned_s2t=learned_s2t)
    ours = setup.run(chunk_size=chunk_size, temperature=2.0, agreement_mask=agreement_mask)
    sum(ours[name][0] for name in LOSS_TERMS).backward()
    our_grads = setup.grads()
    naive = setup.naive(temperature=2.0, agreement_mask=agreement_mask)
    sum(naive[name] for name in LOSS_TERMS).backward()
    naive_grads = setup.grads()
    for name in LOSS_TERMS:
        torch.testing.assert_close(ours[name][0].double(), naive[name], rtol=1e-5, atol=1e-5)
    assert ours["t2s_agreement"][0].item() == naive["agree"].item()
    assert ours["t2s_label_coverage"][0].item() == naive["mapped"].item()
    assert ours["ce"][1].item() == 8 and ours["kd_t2s"][1].item() == A
    assert our_grads[3] is None, "the teacher head must never receive gradient"
    for ours_grad, naive_grad in zip(our_grads[:3] + our_grads[4:], naive_grads[:3] + naive_grads[4:], strict=True):
        torch.testing.assert_close(ours_grad, naive_grad.to(ours_grad.dtype), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["reverse_kl", "js", "skewed_forward_kl", "adaptive_kl", "total_variation"])
def test_chunked_equals_unchunked_for_every_divergence(name):
    setup = Setup(seed=1, learned_s2t=True)
    results = []
    for chunk_size in (2, 1000):
        out = setup.run(chunk_size=chunk_size, divergence=name)
        sum(out[n][0] for n in LOSS_TERMS).backward()
        results.append(([out[n][0].detach() for n in LOSS_TERMS], setup.grads()))
    (values_a, grads_a), (values_b, grads_b) = results
    for a, b in zip(values_a, values_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learned_s2t", [False, True])
def test_gradient_reaches_only_the_intended_parameters(learned_s2t):
    setup = Setup(seed=2, learned_s2t=learned_s2t)

    def grads_of(term):
        setup.run(agreement_mask=False)[term][0].backward()
        hidden, student_w, projector_w, teacher_w, *learned = setup.grads()
        nonzero = lambda g: g is not None and bool(g.abs().sum() > 0)  # noqa: E731
        return nonzero(hidden), nonzero(student_w), nonzero(projector_w), teacher_w, [nonzero(g) for g in learned]

    # ce_t2s trains only the projector.
    assert grads_of("ce_t2s") == (False, False, True, None, [False] * learned_s2t)
    # kd_t2s trains the student (body and head) against a detached target: nothing reaches P.
    assert grads_of("kd_t2s") == (True, True, False, None, [False] * learned_s2t)
    # kd_s2t reaches the student body (and a learned map) but not the student head: the map is detached.
    assert grads_of("kd_s2t") == (True, False, False, None, [True] * learned_s2t)


def test_identity_teacher_equals_student_gives_zero_kd():
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(V, D, generator=gen)
    hidden = torch.randn(A, D, generator=gen)
    projector = T2SProjector(D, D).init_ideal_(weight, weight)
    torch.testing.assert_close(projector.weight.detach(), torch.eye(D), atol=1e-5, rtol=0)
    s2t = PinvS2TMap(weight, torch.arange(V))
    s2t.rebuild(weight)
    torch.testing.assert_close(s2t.matrix_ED, torch.eye(D), atol=1e-5, rtol=0)
    head = lambda h: F.linear(h, weight)  # noqa: E731
    out = dskd_loss(
        hidden,
        hidden,
        student_head=head,
        student_head_frozen=head,
        teacher_head=head,
        t2s_projector=projector,
        s2t_map=s2t,
        teacher_to_student_ids=torch.arange(V),
        options=DSKDOptions(chunk_size=4),
    )
    assert out["kd_t2s"][0].item() == pytest.approx(0.0, abs=1e-5)
    assert out["kd_s2t"][0].item() == pytest.approx(0.0, abs=1e-5)
    assert out["t2s_agreement"][0].item() == A and out["s2t_acc"][0].item() == A


def test_permuted_teacher_vocabulary_with_id_map_equals_same_vocabulary():
    """ETA path: a teacher whose vocabulary is a permutation of the student's, with the matching id map,
    gives exactly the same-vocabulary terms (identity alignment, identity map)."""
    gen = torch.Generator().manual_seed(4)
    student_w, teacher_w = torch.randn(V, D, generator=gen), torch.randn(V, E, generator=gen)
    hidden_s = torch.randn(A, D, generator=gen)
    hidden_t = torch.randn(A, E, generator=gen)
    perm = torch.randperm(V, generator=gen)  # teacher id j stands for student token perm[j]
    teacher_w_perm = teacher_w[perm]
    results = []
    for t_weight, id_map, overlap_t in ((teacher_w, torch.arange(V), torch.arange(V)), (teacher_w_perm, perm, None)):
        overlap_student = torch.arange(V)
        teacher_rows = t_weight[overlap_t] if overlap_t is not None else teacher_w_perm[torch.argsort(perm)]
        projector = T2SProjector(E, D).init_ideal_(student_w[overlap_student], teacher_rows)
        s2t = PinvS2TMap(teacher_rows, overlap_student)
        s2t.rebuild(student_w)
        out = dskd_loss(
            hidden_s,
            hidden_t,
            student_head=lambda h: h @ student_w.T,
            student_head_frozen=lambda h: h @ student_w.T,
            teacher_head=lambda h, w=t_weight: h @ w.T,
            t2s_projector=projector,
            s2t_map=s2t,
            teacher_to_student_ids=id_map,
            options=DSKDOptions(chunk_size=3, agreement_mask=False),
        )
        results.append(out)
    for name in ("kd_t2s", "ce_t2s", "kd_s2t", "t2s_agreement", "s2t_acc"):
        torch.testing.assert_close(results[0][name][0], results[1][name][0], rtol=1e-5, atol=1e-5)


def test_unmapped_and_padded_teacher_predictions_are_ignored_not_relabelled():
    setup = Setup(seed=5, vocab_pad=5)
    with torch.no_grad():  # make padded teacher rows (ids >= len(id_map)) win the argmax on some rows
        setup.teacher_weight[W:] = 0.0
        setup.teacher_weight[W + 2] = setup.teacher_hidden[0] * 50
        setup.teacher_weight[W + 4] = setup.teacher_hidden[1] * 50
    out = setup.run()
    naive = setup.naive()
    teacher_pred = (setup.teacher_hidden @ setup.teacher_weight.detach().T).argmax(-1)
    assert teacher_pred[0] >= W and teacher_pred[1] >= W, "the test set-up must hit padded rows"
    assert out["t2s_label_coverage"][0].item() == naive["mapped"].item() <= A - 2
    torch.testing.assert_close(out["ce_t2s"][0].double(), naive["ce_t2s"], rtol=1e-5, atol=1e-5)
    # An "unknown -> EOS" mapping (the anchor bug) would add the CE of rows 0 and 1 against some label.
    eos_labels = torch.full((2,), V - 1)
    eos_ce = F.cross_entropy((setup.teacher_hidden[:2] @ setup.projector.weight.T) @ setup.student_weight.T, eos_labels)
    assert eos_ce.item() > 0


def test_agreement_mask_edges():
    setup = Setup(seed=6)
    setup.id_map[:] = -1  # nothing maps: no row can agree
    masked = setup.run(agreement_mask=True)
    unmasked = setup.run(agreement_mask=False)
    assert masked["kd_t2s"][0].item() == 0.0 and masked["ce_t2s"][0].item() == 0.0
    assert unmasked["kd_t2s"][0].item() > 0
    masked["kd_t2s"][0].backward()
    assert torch.isfinite(setup.student_hidden.grad).all()


def test_spaces_switch_and_chunk_bound():
    setup = Setup(seed=7)
    calls: list[int] = []

    def spy(weight):
        def head(h):
            calls.append(h.shape[0])
            return F.linear(h, weight)

        return head

    def run(spaces, labels):
        return dskd_loss(
            setup.student_hidden,
            setup.teacher_hidden,
            student_head=spy(setup.student_weight),
            student_head_frozen=spy(setup.student_weight.detach()),
            teacher_head=spy(setup.teacher_weight.detach()),
            t2s_projector=setup.projector,
            s2t_map=setup.s2t,
            teacher_to_student_ids=setup.id_map,
            options=DSKDOptions(chunk_size=4, spaces=spaces),
            student_labels_A=labels,
        )

    student_only = run("student", None)
    assert student_only["kd_s2t"][0].item() == 0.0 and student_only["kd_t2s"][0].item() > 0
    teacher_only = run("teacher", None)
    assert teacher_only["kd_t2s"][0].item() == 0.0 and teacher_only["ce_t2s"][0].item() == 0.0
    assert teacher_only["kd_s2t"][0].item() > 0
    calls.clear()
    both = run("both", setup.labels)
    sum(both[n][0] for n in LOSS_TERMS).backward()
    assert max(calls) == 4, "no head call may see more rows than one chunk, forward or backward"
    # per chunk: teacher target, s2t, frozen t2s, student (+ frozen target again and student in the backward)
    assert len(calls) == 3 * 6


def test_bf16_inputs_give_finite_fp32_losses():
    setup32 = Setup(seed=8)
    setup16 = Setup(seed=8, dtype=torch.bfloat16)
    out16 = setup16.run()
    out32 = setup32.run()
    for name in LOSS_TERMS:
        value = out16[name][0]
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(out32[name][0].item(), rel=0.1, abs=0.5)
    sum(out16[n][0] for n in LOSS_TERMS).backward()
    assert torch.isfinite(setup16.student_hidden.grad.float()).all()


def test_empty_rows_and_bad_input():
    setup = Setup(seed=9)
    empty = dskd_loss(
        setup.student_hidden[:0],
        setup.teacher_hidden[:0],
        student_head=lambda h: F.linear(h, setup.student_weight),
        student_head_frozen=lambda h: F.linear(h, setup.student_weight.detach()),
        teacher_head=lambda h: F.linear(h, setup.teacher_weight.detach()),
        t2s_projector=setup.projector,
        s2t_map=setup.s2t,
        teacher_to_student_ids=setup.id_map,
        options=DSKDOptions(),
    )
    total = sum(empty[n][0] for n in ("kd_t2s", "ce_t2s", "kd_s2t"))
    assert total.item() == 0.0 and empty["kd_t2s"][1].item() == 0
    total.backward()
    with pytest.raises(ValueError, match="must be paired"):
        dskd_loss(
            setup.student_hidden,
            setup.teacher_hidden[:3],
            student_head=None,
            student_head_frozen=None,
            teacher_head=None,
            t2s_projector=setup.projector,
            s2t_map=setup.s2t,
            teacher_to_student_ids=setup.id_map,
            options=DSKDOptions(),
        )
    setup.id_map[:] = V + 3
    with pytest.raises(ValueError, match="student head has only 17 rows"):
        setup.run()
    with pytest.raises(ValueError, match="unknown divergence"):
        setup.run(divergence="kl")


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_student_ce_matches_full_cross_entropy(chunk_size):
    torch.manual_seed(10)
    head = torch.nn.Linear(D, V, bias=True)
    hidden = torch.randn(9, D, requires_grad=True)
    labels = torch.randint(0, V, (9,))
    labels[2] = -100
    total, count = student_ce(hidden, labels, head, chunk_size=chunk_size)
    total.backward()
    ours = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad, head.weight.grad, head.bias.grad = None, None, None
    expected = F.cross_entropy(head(hidden), labels, reduction="sum")
    expected.backward()
    assert count.item() == 8
    torch.testing.assert_close(total, expected)
    for got, want in zip(ours, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        torch.testing.assert_close(got, want)


def test_gathered_rows_independent_of_padding_and_lengths():
    """Engine-style gather of predicting rows: same terms under any padding and with T != S; equal to the
    same-vocabulary masked layout (labels shifted by one) when the alignment is the identity."""
    from dskd_scale.losses import predicting_rows

    setup = Setup(seed=11)
    gen = torch.Generator().manual_seed(11)
    response_lengths, prompt_s, prompt_t = [3, 4, 3], [2, 1, 3], [4, 2, 5]  # teacher prompts are longer
    hidden_s = [torch.randn(p + n, D, generator=gen) for p, n in zip(prompt_s, response_lengths, strict=True)]
    hidden_t = [torch.randn(p + n, E, generator=gen) for p, n in zip(prompt_t, response_lengths, strict=True)]

    def pad(rows, length):
        return torch.stack([F.pad(r, (0, 0, 0, length - r.shape[0]), value=7.0) for r in rows])

    batch = torch.cat([torch.full((n,), b) for b, n in enumerate(response_lengths)])
    align_s = torch.cat([torch.arange(p, p + n) for p, n in zip(prompt_s, response_lengths, strict=True)])
    align_t = torch.cat([torch.arange(p, p + n) for p, n in zip(prompt_t, response_lengths, strict=True)])
    results = []
    for extra in (0, 5):
        h_s = pad(hidden_s, max(r.shape[0] for r in hidden_s) + extra)
        h_t = pad(hidden_t, max(r.shape[0] for r in hidden_t) + 2 * extra)
        rows_s, rows_t = predicting_rows(h_s, batch, align_s), predicting_rows(h_t, batch, align_t)
        results.append(_terms(setup, rows_s, rows_t))
    # Same-vocabulary layout: shifted labels mark the response; a boolean mask selects the same rows.
    h_s = pad(hidden_s, 8)
    labels = torch.full((3, 8), -100)
    for b, (p, n) in enumerate(zip(prompt_s, response_lengths, strict=True)):
        labels[b, p : p + n] = 1
    rows_s = h_s[:, :-1][labels[:, 1:] != -100]
    h_t = pad(hidden_t, 10)
    labels_t = torch.full((3, 10), -100)
    for b, (p, n) in enumerate(zip(prompt_t, response_lengths, strict=True)):
        labels_t[b, p : p + n] = 1
    results.append(_terms(setup, rows_s, h_t[:, :-1][labels_t[:, 1:] != -100]))
    for other in results[1:]:
        for name in ("kd_t2s", "ce_t2s", "kd_s2t"):
            torch.testing.assert_close(results[0][name], other[name])
    with pytest.raises(ValueError, match="aligned positions must lie in"):
        predicting_rows(h_s, batch, align_s - 2)


def _terms(setup, rows_s, rows_t):
    out = dskd_loss(
        rows_s,
        rows_t,
        student_head=lambda h: F.linear(h, setup.student_weight.detach()),
        student_head_frozen=lambda h: F.linear(h, setup.student_weight.detach()),
        teacher_head=lambda h: F.linear(h, setup.teacher_weight.detach()),
        t2s_projector=setup.projector,
        s2t_map=setup.s2t,
        teacher_to_student_ids=setup.id_map,
        options=DSKDOptions(chunk_size=4),
    )
    return {name: value[0].detach() for name, value in out.items()}
