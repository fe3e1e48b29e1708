"""DSKD v2 terms: naive-reference equality (values and gradients), gradient isolation, ETA id maps, edges.

Float comparisons use tolerances derived from the dtype and the reduction length (``tolerance.py``), or fp64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from losses_reference import naive_dskd, pinv_s2t_matrix
from tolerance import reduction_tolerance

from dskd_scale.losses import LOSS_TERMS, DSKDOptions, TrainableHead, dskd_loss, student_ce
from dskd_scale.projectors import LearnedS2TMap, PinvS2TMap, T2SProjector

A, D, E, V, W = 10, 6, 8, 17, 19
OVERLAP = 12
# Longest reduction chain behind one value or gradient entry: a head matmul (E), a softmax over the teacher
# vocabulary (W, padded rows included), the row sum (A), and the s2t map (D).
CHAIN = E + W + 5 + A + D


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
        overlap = torch.arange(OVERLAP)
        self.overlap = overlap
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

    def s2t_matrix(self):
        """Q from the equations (fp64 least squares), or the learned map's weight."""
        if isinstance(self.s2t, LearnedS2TMap):
            return self.s2t.weight
        return pinv_s2t_matrix(self.teacher_weight[self.overlap], self.student_weight[self.overlap])

    def naive(self, **kw):
        return naive_dskd(
            self.student_hidden,
            self.teacher_hidden,
            self.student_weight,
            self.teacher_weight,
            self.projector.weight,
            self.s2t_matrix(),
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
    """fp32 chunked terms and gradients vs the fp64 full-logit equations (s2t map solved independently)."""
    setup = Setup(learned_s2t=learned_s2t)
    ours = setup.run(chunk_size=chunk_size, temperature=2.0, agreement_mask=agreement_mask)
    sum(ours[name][0] for name in LOSS_TERMS).backward()
    our_grads = setup.grads()
    naive = setup.naive(temperature=2.0, agreement_mask=agreement_mask)
    sum(naive[name] for name in LOSS_TERMS).backward()
    naive_grads = setup.grads()
    # fp32 vs fp64: our side carries the fp32 rounding of the reduction chain, and of the stored pinv,
    # whose relative error is amplified by the condition number of the teacher overlap rows.
    condition = float(torch.linalg.cond(setup.teacher_weight[setup.overlap].detach().double()))
    for name in LOSS_TERMS:
        scale = float(naive[name].detach().abs()) + 1.0
        torch.testing.assert_close(
            ours[name][0].double(), naive[name], **reduction_tolerance(torch.float32, CHAIN * condition, scale=scale)
        )
    assert ours["t2s_agreement"][0].item() == naive["agree"].item()
    assert ours["t2s_label_coverage"][0].item() == naive["mapped"].item()
    assert ours["ce"][1].item() == 8 and ours["kd_t2s"][1].item() == A
    assert our_grads[3] is None, "the teacher head must never receive gradient"
    for ours_grad, naive_grad in zip(our_grads[:3] + our_grads[4:], naive_grads[:3] + naive_grads[4:], strict=True):
        tol = reduction_tolerance(torch.float32, CHAIN * condition, scale=float(naive_grad.abs().max()) + 1.0)
        torch.testing.assert_close(ours_grad.double(), naive_grad.double(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["reverse_kl", "js", "skewed_forward_kl", "adaptive_kl", "total_variation"])
def test_chunked_equals_unchunked_for_every_divergence(name, dtype):
    """Chunking changes only the summation order: values and gradients agree to the dtype's reduction bound."""
    setup = Setup(seed=1, learned_s2t=True, dtype=dtype)
    results = []
    for chunk_size in (2, 1000):
        out = setup.run(chunk_size=chunk_size, divergence=name)
        sum(out[n][0] for n in LOSS_TERMS).backward()
        results.append(([out[n][0].detach() for n in LOSS_TERMS], setup.grads()))
    (values_a, grads_a), (values_b, grads_b) = results
    for a, b in zip(values_a, values_b, strict=True):
        torch.testing.assert_close(a, b, **reduction_tolerance(dtype, CHAIN, scale=float(b.abs()) + 1.0))
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, **reduction_tolerance(dtype, CHAIN, scale=float(b.abs().max()) + 1.0))


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
    # fp64 pinv stored in fp32: off by the fp32 rounding, amplified by the head's condition number.
    identity_tol = reduction_tolerance(torch.float32, D * float(torch.linalg.cond(weight.double())))
    torch.testing.assert_close(projector.weight.detach(), torch.eye(D), **identity_tol)
    s2t = PinvS2TMap(weight, torch.arange(V))
    s2t.rebuild(weight)
    torch.testing.assert_close(s2t.matrix_ED, torch.eye(D), **reduction_tolerance(torch.float32, V * D))
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
    zero_tol = reduction_tolerance(torch.float32, CHAIN)["atol"]  # a KL of logits equal up to rounding
    assert out["kd_t2s"][0].item() == pytest.approx(0.0, abs=zero_tol)
    assert out["kd_s2t"][0].item() == pytest.approx(0.0, abs=zero_tol)
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
        scale = float(results[0][name][0].detach().abs()) + 1.0
        torch.testing.assert_close(
            results[0][name][0], results[1][name][0], **reduction_tolerance(torch.float32, CHAIN, scale=scale)
        )


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
    tolerance = reduction_tolerance(torch.float32, CHAIN, scale=float(naive["ce_t2s"].detach()) + 1.0)
    torch.testing.assert_close(out["ce_t2s"][0].double(), naive["ce_t2s"], **tolerance)
    # The anchor bug relabels unknown teacher predictions as EOS: the same equations with every unmapped
    # or padded id sent to the student EOS (V - 1) give a different ce_t2s, and ours must not be that one.
    eos_map = torch.where(setup.id_map >= 0, setup.id_map, V - 1)
    eos_map = torch.cat([eos_map, torch.full((5,), V - 1)])  # the padded teacher rows too
    with_eos = naive_dskd(setup.student_hidden, setup.teacher_hidden, setup.student_weight, setup.teacher_weight,
                          setup.projector.weight, setup.s2t_matrix(), eos_map)
    assert with_eos["mapped"].item() == A
    gap = float(with_eos["ce_t2s"].detach() - naive["ce_t2s"].detach())
    assert gap > 100 * tolerance["atol"], f"the EOS relabelling must be distinguishable (gap {gap})"
    assert abs(float(out["ce_t2s"][0].detach()) - float(with_eos["ce_t2s"].detach())) > 100 * tolerance["atol"]


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
    """bf16 heads and rows: fp32 results, close to the fp64 equations evaluated on the same bf16 values.

    Bound: every head output and mapped row is rounded to bf16 once (relative error eps_bf16 / 2 of the
    logits' magnitude), and a per-row KL or CE moves by at most 2 * max|d logit| / tau under a logit
    perturbation (its logit gradient is a difference of two distributions); three roundings sit on the
    longest path (projector, s2t map, head), so each row contributes at most 3 * eps_bf16 * max|logit|.
    """
    setup = Setup(seed=8, dtype=torch.bfloat16)
    out = setup.run()
    naive = setup.naive()
    with torch.no_grad():
        logits = torch.cat([setup.student_hidden.float() @ setup.student_weight.float().T,
                            setup.teacher_hidden.float() @ setup.teacher_weight.float().T], dim=1)
    per_row = 3 * torch.finfo(torch.bfloat16).eps * float(logits.abs().max())
    for name in LOSS_TERMS:
        value = out[name][0]
        assert value.dtype == torch.float32 and torch.isfinite(value)
        expected = float(naive[name].detach())
        assert abs(value.item() - expected) <= A * per_row, (name, value.item(), expected)
    sum(out[n][0] for n in LOSS_TERMS).backward()
    assert torch.isfinite(setup.student_hidden.grad.float()).all()


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
    chain = D + V + 9  # head matmul, softmax over V, sum over the rows
    torch.testing.assert_close(total, expected, **reduction_tolerance(torch.float32, chain, scale=float(expected)))
    for got, want in zip(ours, (hidden.grad, head.weight.grad, head.bias.grad), strict=True):
        scale = float(want.abs().max()) + 1.0
        torch.testing.assert_close(got, want, **reduction_tolerance(torch.float32, chain, scale=scale))


def test_gathered_rows_independent_of_padding_and_lengths():
    """Engine-style gather of predicting rows: same terms under any padding and with T != S; equal to the
    same-vocabulary masked layout (labels shifted by one) when the alignment is the identity."""
    def predicting_rows(hidden_BLH, batch_A, position_A):  # the engine's gather (criteria.batch_rows)
        return hidden_BLH[batch_A, position_A - 1]

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
            torch.testing.assert_close(results[0][name], other[name], **reduction_tolerance(torch.float32, CHAIN))


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


class CountingHead(TrainableHead):
    """A ``TrainableHead`` that counts the logits it forms, to tell the fast backward from a recomputation."""

    def __init__(self, weight):
        super().__init__(weight)
        self.logit_calls = 0

    def logits(self, hidden):
        self.logit_calls += 1
        return super().logits(hidden)


@pytest.mark.parametrize("chunk_size", [2, 1000])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 1.0)])
@pytest.mark.parametrize("expected", ["right", "wrong", "none"])  # none: weights unknown (0), recomputed
def test_fused_head_equals_autograd_head(chunk_size, weights, expected):
    """The one-buffer fused head gives the plain autograd values and gradients; with the right expected
    weights (up to a common factor, as DeepSpeed's 1/GA) its backward forms no logits at all."""
    setup = Setup(seed=12, dtype=torch.float64)
    w_kd, w_ce = weights

    def backward_of(out):
        (w_kd * out["kd_t2s"][0] + w_ce * out["ce"][0] + out["ce_t2s"][0] + out["kd_s2t"][0]).backward()

    plain = setup.run(chunk_size=chunk_size, agreement_mask=False)
    backward_of(plain)
    hidden_grad, weight_grad, projector_grad, _ = setup.grads()

    head = CountingHead(setup.student_weight)
    head_weights = {"right": {"kd_t2s": 5 * w_kd, "ce": 5 * w_ce}, "wrong": {"kd_t2s": 1.0, "ce": 3.0}}
    fused = dskd_loss(
        setup.student_hidden, setup.teacher_hidden,
        student_head=head,
        student_head_frozen=lambda h: F.linear(h, setup.student_weight.detach()),
        teacher_head=lambda h: F.linear(h, setup.teacher_weight.detach()),
        t2s_projector=setup.projector, s2t_map=setup.s2t, teacher_to_student_ids=setup.id_map,
        options=DSKDOptions(chunk_size=chunk_size, agreement_mask=False), student_labels_A=setup.labels,
        head_grad_weights=head_weights.get(expected),
    )
    calls_after_forward = head.logit_calls
    backward_of(fused)
    assert setup.student_weight.grad is None, "the fused head's weight gradient goes to its accumulator only"
    buffer = head.grad_sum
    fused_weight_grad = head.take_gradient()
    assert fused_weight_grad.data_ptr() == buffer.data_ptr(), "the accumulator is scaled in place, not copied"
    recomputed = head.logit_calls > calls_after_forward
    assert recomputed == (expected != "right"), head.logit_calls
    fused_hidden_grad, _, fused_projector_grad, _ = setup.grads()
    tol = reduction_tolerance(torch.float64, CHAIN, scale=10.0)
    for name in LOSS_TERMS:
        torch.testing.assert_close(fused[name][0], plain[name][0], **tol)
    torch.testing.assert_close(fused_weight_grad, weight_grad, **tol)
    torch.testing.assert_close(fused_hidden_grad, hidden_grad, **tol)
    torch.testing.assert_close(fused_projector_grad, projector_grad, **tol)


@pytest.mark.parametrize("grad_weight", [1.0, 0.25])
def test_fused_student_ce_shares_the_one_buffer_and_an_unused_output_is_taken_back(grad_weight):
    """ETA layout: dskd_loss (kd_t2s only) and student_ce use ONE head; their gradients add up in its one
    buffer. A use with a non-zero expected weight that is never backpropagated is an error, not a wrong grad."""
    setup = Setup(seed=13, dtype=torch.float64)
    labels = torch.randint(0, V, (7,), generator=torch.Generator().manual_seed(0))
    ce_hidden = torch.randn(7, D, dtype=torch.float64, requires_grad=True)

    def run(head):
        terms = dskd_loss(
            setup.student_hidden, setup.teacher_hidden, student_head=head,
            student_head_frozen=lambda h: F.linear(h, setup.student_weight.detach()),
            teacher_head=lambda h: F.linear(h, setup.teacher_weight.detach()),
            t2s_projector=setup.projector, s2t_map=setup.s2t, teacher_to_student_ids=setup.id_map,
            options=DSKDOptions(chunk_size=3, agreement_mask=False), head_grad_weights={"kd_t2s": 2.0},
        )
        terms["ce"] = student_ce(ce_hidden, labels, head, chunk_size=2, grad_weight=grad_weight * 4.0)
        return terms

    plain = run(lambda h: F.linear(h, setup.student_weight))
    (2.0 * plain["kd_t2s"][0] + grad_weight * 4.0 * plain["ce"][0]).backward()
    expected_weight_grad, expected_hidden_grad = setup.student_weight.grad.clone(), ce_hidden.grad.clone()
    setup.grads()
    ce_hidden.grad = None
    head = TrainableHead(setup.student_weight)
    fused = run(head)
    (2.0 * fused["kd_t2s"][0] + grad_weight * 4.0 * fused["ce"][0]).backward()
    tol = reduction_tolerance(torch.float64, CHAIN, scale=10.0)
    torch.testing.assert_close(head.take_gradient(), expected_weight_grad, **tol)
    torch.testing.assert_close(ce_hidden.grad, expected_hidden_grad, **tol)
    # An output given a non-zero expected weight must be backpropagated: a half-used head refuses loudly.
    setup.grads()
    ce_hidden.grad = None
    head = TrainableHead(setup.student_weight)
    terms = run(head)
    (terms["kd_t2s"][0] + terms["kd_s2t"][0]).backward()  # the CE (weight 4 * grad_weight) is left out
    with pytest.raises(RuntimeError, match="were not backpropagated"):
        head.take_gradient()


def test_trainable_head_called_as_a_plain_head_keeps_one_leaf():
    """Baselines call the head as a callable inside ``chunked_head_loss`` (recomputed in the backward): every
    call shares one leaf, so the gradient is one buffer, and ``take_gradient`` returns the exact sum."""
    from dskd_scale.losses import chunked_head_loss

    gen = torch.Generator().manual_seed(14)
    weight = torch.randn(V, D, dtype=torch.float64, generator=gen)
    hidden = torch.randn(9, D, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, V, (9,), generator=gen)
    head = TrainableHead(weight)
    (total,) = chunked_head_loss(lambda h, y: (F.cross_entropy(head(h), y, reduction="sum"),), hidden, labels,
                                 chunk_size=2)
    total.backward()
    leaf = weight.clone().requires_grad_(True)
    F.cross_entropy(hidden.detach() @ leaf.T, labels, reduction="sum").backward()
    torch.testing.assert_close(head.take_gradient(), leaf.grad, **reduction_tolerance(torch.float64, CHAIN, scale=10.0))
    assert head.take_gradient() is None, "the gradient is handed out once"
