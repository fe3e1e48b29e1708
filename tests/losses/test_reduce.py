"""Global-count reduction: hand-computed combination and token-mean invariance across ranks x micro-batches."""

from __future__ import annotations

import pytest
import torch
from losses_reference import TinyDistillation
from tolerance import approx_tolerance, reduction_tolerance

from dskd_scale.losses import combine_terms, term_weights, use_t2s_agreement_mask

ALPHA = 0.4
HAND = approx_tolerance(torch.float32, 8)  # a hand-computed combination of at most 8 fp32 terms
# A gradient entry sums over the examples' rows (~40), a head softmax (V, W ~ 13) and hidden sizes (~8) in
# fp32, in an order that depends on the split: the bound follows from that chain (tolerance.py).
CHAIN = 40 + 13 + 13 + 8 + 8


def GRAD_TOLERANCE(want):  # noqa: N802 (reads as a constant at the call sites)
    return reduction_tolerance(torch.float32, CHAIN, scale=float(want.abs().max()) + 1.0)


def _t(value):
    return torch.tensor(float(value))


def test_hand_computed_combination_and_scaling():
    terms = {
        "ce": (_t(6.0), _t(3)),
        "kd_t2s": (_t(2.0), _t(2)),
        "ce_t2s": (_t(4.0), _t(2)),
        "kd_s2t": (_t(1.0), _t(2)),
        "t2s_agreement": (_t(1), _t(2)),
    }
    counts = {"ce": 12, "kd_t2s": 8, "ce_t2s": 8, "kd_s2t": 8, "t2s_agreement": 8}
    loss, metrics = combine_terms(terms, counts, alpha=0.3, world_size=4, grad_accum_steps=2)
    total = 0.7 * 6 / 12 + 0.3 * (2 / 8 + 4 / 8 + 1 / 8)
    assert loss.item() == pytest.approx(8 * total, **HAND)
    assert metrics["loss"].item() == pytest.approx(total, **HAND)
    assert metrics["t2s_agreement"].item() == pytest.approx(1 / 8, **HAND)
    student_only, _ = combine_terms(terms, counts, alpha=0.3, world_size=1, grad_accum_steps=1, spaces="student")
    assert student_only.item() == pytest.approx(0.7 * 0.5 + 0.3 * (0.25 + 0.5), **HAND)
    teacher_only, _ = combine_terms(terms, counts, alpha=1.0, world_size=1, grad_accum_steps=1, spaces="teacher")
    assert teacher_only.item() == pytest.approx(1 / 8, **HAND)
    ce_only, _ = combine_terms({"ce": terms["ce"]}, {"ce": 12}, alpha=0.0, world_size=1, grad_accum_steps=1)
    assert ce_only.item() == pytest.approx(0.5, **HAND)


def test_empty_terms_and_bad_arguments():
    zero = (torch.zeros(()), torch.zeros((), dtype=torch.long))
    terms = {name: zero for name in ("ce", "kd_t2s", "ce_t2s", "kd_s2t")}
    loss, _ = combine_terms(terms, dict.fromkeys(terms, 0), alpha=0.5, world_size=2, grad_accum_steps=3)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    with pytest.raises(KeyError, match="no entry for loss term 'kd_s2t'"):
        combine_terms(terms, {"ce": 1, "kd_t2s": 1, "ce_t2s": 1}, alpha=0.5, world_size=1, grad_accum_steps=1)
    with pytest.raises(KeyError, match="needs terms"):
        combine_terms({"ce": zero}, {"ce": 1}, alpha=0.5, world_size=1, grad_accum_steps=1)
    with pytest.raises(ValueError, match="alpha must be in"):
        combine_terms(terms, {}, alpha=1.5, world_size=1, grad_accum_steps=1)


def test_agreement_threshold_rule():
    assert use_t2s_agreement_mask(90, 100, 1.0) is True  # the paper's default: always masked
    assert use_t2s_agreement_mask(90, 100, 0.8) is False
    assert use_t2s_agreement_mask(70, 100, 0.8) is True
    assert use_t2s_agreement_mask(0, 0, 0.5) is True


def simulate_deepspeed(setup: TinyDistillation, ranks: list[list[list[int]]], *, use_global_counts: bool = True):
    """Gradient DeepSpeed would apply: per rank, sum of backward(loss / GA) over micro-batches; mean over ranks."""
    world, accum = len(ranks), len(ranks[0])
    micro_batches = [[setup.examples[i] for i in ids] for rank in ranks for ids in rank]
    global_counts = {}
    for batch in micro_batches:
        for name, value in setup.local_counts(batch).items():
            global_counts[name] = global_counts.get(name, 0) + value
    averaged, metric_total = None, 0.0
    for rank in ranks:
        for ids in rank:
            batch = [setup.examples[i] for i in ids]
            counts = global_counts if use_global_counts else setup.local_counts(batch)
            loss, metrics = combine_terms(
                setup.terms(batch), counts, alpha=ALPHA, world_size=world, grad_accum_steps=accum
            )
            (loss / accum).backward()  # DeepSpeed's engine.backward divides by the GA steps
            metric_total += metrics["loss"].item()
        grads = setup.take_grads()
        averaged = grads if averaged is None else [a + g for a, g in zip(averaged, grads, strict=True)]
    return [g / world for g in averaged], metric_total


def test_token_mean_invariance_across_ranks_and_micro_batches():
    setup = TinyDistillation(seed=0)
    reference, reference_loss = simulate_deepspeed(setup, [[list(range(7))]])
    split, split_loss = simulate_deepspeed(setup, [[[0, 1], [2]], [[3, 4, 5], [6]]])
    assert split_loss == pytest.approx(reference_loss, **approx_tolerance(torch.float32, CHAIN))
    for got, want in zip(split, reference, strict=True):
        torch.testing.assert_close(got, want, **GRAD_TOLERANCE(want))
    # The anchor's per-micro-batch (local) normalisation is NOT invariant: the test can tell them apart.
    local, _ = simulate_deepspeed(setup, [[[0, 1], [2]], [[3, 4, 5], [6]]], use_global_counts=False)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(local, reference, strict=True))


@pytest.mark.parametrize("spaces", ["both", "student", "teacher"])
def test_term_weights_are_the_gradients_of_the_combined_loss(spaces):
    """``term_weights`` (what the fused head expects) equals d(loss to backward)/d(term sum) of combine_terms."""
    names = ("ce", "kd_t2s", "ce_t2s", "kd_s2t")
    sums = {name: torch.tensor(float(i + 1), requires_grad=True) for i, name in enumerate(names)}
    counts = {"ce": 12, "kd_t2s": 8, "ce_t2s": 8, "kd_s2t": 8}
    loss, _ = combine_terms({n: (sums[n], torch.tensor(1)) for n in names}, counts, alpha=0.3, world_size=4,
                            grad_accum_steps=2, spaces=spaces)
    loss.backward()
    weights = term_weights(counts, alpha=0.3, world_size=4, grad_accum_steps=2, spaces=spaces)
    for name in names:
        got = 0.0 if sums[name].grad is None else sums[name].grad.item()
        assert weights.get(name, 0.0) == pytest.approx(got, **HAND), name
    # Locally normalised (official) terms are left out: their count is known only after the forward.
    assert "kd_t2s" not in term_weights(counts, alpha=0.3, world_size=1, grad_accum_steps=1, local_terms=("kd_t2s",))
