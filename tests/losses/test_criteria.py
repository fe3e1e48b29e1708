"""``criteria.compute_terms`` + ``combine`` without DeepSpeed: a stub ``engines`` with plain heads.

Covers the plumbing the loop relies on (row gathering from a Contract 2 batch, the fused vs separate CE,
the agreement-mask switch, ``kd.spaces``) and ``kd.normalization=official`` against an independent
re-implementation of the official DSKD v2 code's per-micro-batch formulas (``dskd_anchor.md`` sections 1.4
and 2.4), written here with full-logit fp64 torch, and DeepSpeed's averaging simulated by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tolerance import reduction_tolerance

from dskd_scale.config.run import KDConfig
from dskd_scale.criteria import batch_rows, combine, compute_terms, local_counts
from dskd_scale.losses import use_t2s_agreement_mask
from dskd_scale.projectors import PinvS2TMap, T2SProjector

D, E, V, IN = 6, 8, 13, 5
ALPHA, TAU = 0.4, 2.0
CHAIN = 40 + V + D + E + 10  # rows, softmax, hidden sizes, s2t map: fp32 reduction lengths on one value


def kl(student_logits, target_logits):
    """Forward KL(p || q) per row from softmaxes at temperature TAU (anchor section 1.6), fp64."""
    log_q = F.log_softmax(student_logits.double() / TAU, -1)
    log_p = F.log_softmax(target_logits.double() / TAU, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class World:
    """A student (linear body over fixed inputs + head), a teacher, and a batch of ragged examples.

    ``eta=False``: same vocabulary, the identity id map, every label row aligned (the fused-CE path).
    ``eta=True``: an 11-token teacher vocabulary, 9 of its tokens mapped, a subset of label rows aligned
    at teacher positions shifted by a longer teacher prompt.
    """

    def __init__(self, *, eta: bool, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.eta = eta
        self.body = torch.nn.Linear(IN, D)
        self.head = torch.nn.Parameter(torch.randn(V, D, generator=gen))
        teacher_vocab = 11 if eta else V
        mixing = torch.randn(D, E, generator=gen)
        if eta:
            self.id_map = torch.full((teacher_vocab,), -1)
            self.id_map[:9] = torch.randperm(V, generator=gen)[:9]
            overlap_teacher = torch.arange(9)
        else:
            self.id_map = torch.arange(V)
            overlap_teacher = torch.arange(V)
        overlap_student = self.id_map[overlap_teacher]
        # Nine teacher rows lie near the student head's column space, so the ideal projector nearly reproduces
        # them and a good share of rows agree (full rank, so pinv and least squares coincide).
        self.teacher_weight = torch.randn(teacher_vocab, E, generator=gen) * 0.5
        self.teacher_weight[:9] = self.head.detach()[self.id_map[:9]] @ mixing + 0.1 * torch.randn(9, E, generator=gen)
        self.overlap = (overlap_student, overlap_teacher)
        self.projector = T2SProjector(E, D).init_ideal_(
            self.head.detach()[overlap_student], self.teacher_weight[overlap_teacher]
        )
        self.s2t = PinvS2TMap(self.teacher_weight[overlap_teacher], overlap_student)
        self.s2t.rebuild(self.head.detach())
        self.examples = []
        for _ in range(6):
            prompt_s = int(torch.randint(1, 3, (1,), generator=gen))
            response = int(torch.randint(2, 6, (1,), generator=gen))
            prompt_t = prompt_s + (2 if eta else 0)
            ids = torch.randint(0, V, (prompt_s + response,), generator=gen)
            positions = torch.arange(prompt_s, prompt_s + response)
            keep = torch.rand(response, generator=gen) < 0.7 if eta else torch.ones(response, dtype=torch.bool)
            keep[0] = True
            self.examples.append({
                "x": torch.randn(prompt_s + response, IN, generator=gen),
                "ids": ids, "prompt_s": prompt_s,
                "aligned_s": positions[keep], "aligned_t": positions[keep] - prompt_s + prompt_t,
                "teacher_hidden": torch.randn(prompt_t + response, E, generator=gen) * 2,
            })

    # ---------- the Contract 2 batch and the stub engines ----------
    def batch(self, ids: list[int]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        examples = [self.examples[i] for i in ids]
        s_len = max(ex["ids"].numel() for ex in examples) + 1  # one padded position at least
        t_len = max(ex["teacher_hidden"].shape[0] for ex in examples) + 2
        input_ids = torch.zeros(len(ids), s_len, dtype=torch.long)
        labels = torch.full((len(ids), s_len), -100)
        attention = torch.zeros(len(ids), s_len, dtype=torch.long)
        student_hidden = torch.zeros(len(ids), s_len, D)
        teacher_hidden = torch.full((len(ids), t_len, E), 9.0)  # padding garbage must never be read
        batch_index, align_s, align_t = [], [], []
        for b, ex in enumerate(examples):
            n = ex["ids"].numel()
            input_ids[b, :n] = ex["ids"]
            labels[b, ex["prompt_s"]:n] = ex["ids"][ex["prompt_s"]:]
            attention[b, :n] = 1
            student_hidden[b, :n] = self.body(ex["x"])
            teacher_hidden[b, : ex["teacher_hidden"].shape[0]] = ex["teacher_hidden"]
            batch_index.append(torch.full((ex["aligned_s"].numel(),), b))
            align_s.append(ex["aligned_s"])
            align_t.append(ex["aligned_t"])
        batch = {
            "student_input_ids": input_ids, "student_labels": labels, "student_attention_mask": attention,
            "align_batch": torch.cat(batch_index), "align_student": torch.cat(align_s),
            "align_teacher": torch.cat(align_t),
        }
        return batch, student_hidden, teacher_hidden

    def engines(self):
        head = self.head
        return SimpleNamespace(
            trainable_student_head=lambda: (lambda h: F.linear(h, head)),
            student_head=SimpleNamespace(frozen_head=lambda: (lambda h: F.linear(h, head.detach()))),
            teacher_head=lambda h: F.linear(h, self.teacher_weight),
            student_module=SimpleNamespace(t2s_projector=self.projector),
            s2t_map=self.s2t,
            teacher_to_student_ids=self.id_map,
            baseline_resources=None,
        )

    def params(self):
        return [self.body.weight, self.body.bias, self.head, self.projector.weight]

    def take_grads(self):
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params()]
        for p in self.params():
            p.grad = None
        return grads

    # ---------- the equations, fp64 full logits ----------
    def pieces(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Per-row quantities of anchor section 1.4 over the given examples (no normalisation)."""
        q_matrix = torch.linalg.lstsq(self.teacher_weight[self.overlap[1]].double(),
                                      self.head.detach()[self.overlap[0]].double(),
                                      driver="gelsd").solution  # pinv(W_t^O) W_s^O: the minimum-norm solution
        ce_sum = torch.zeros((), dtype=torch.float64)
        student_rows, teacher_rows = [], []
        for i in ids:
            ex = self.examples[i]
            hidden = self.body(ex["x"]).double()
            start = ex["prompt_s"]  # position s predicts token s + 1
            logits = hidden @ self.head.double().T
            ce_sum = ce_sum + F.cross_entropy(logits[start - 1 : -1], ex["ids"][start:], reduction="sum")
            student_rows.append(hidden[ex["aligned_s"] - 1])
            teacher_rows.append(ex["teacher_hidden"][ex["aligned_t"] - 1].double())
        h_s, h_t = torch.cat(student_rows), torch.cat(teacher_rows)
        teacher_logits = h_t @ self.teacher_weight.double().T
        mapped = self.id_map[teacher_logits.argmax(-1)]
        has_label = mapped >= 0
        t2s_logits = (h_t @ self.projector.weight.double().T) @ self.head.detach().double().T
        return {
            "ce_sum": ce_sum,
            "has_label": has_label,
            "ce_t2s_rows": F.cross_entropy(t2s_logits, mapped.clamp_min(0), reduction="none") * has_label,
            "agree": (t2s_logits.argmax(-1) == mapped) & has_label,
            "kd_t2s_rows": kl(h_s @ self.head.double().T, t2s_logits.detach()),
            "kd_s2t_rows": kl((h_s @ q_matrix.T) @ self.teacher_weight.double().T, teacher_logits),
        }

    def official_loss(self, ids: list[int], tokens_per_micro_batch: float, *, agreement_mask: bool,
                      spaces: str = "both") -> torch.Tensor:
        """One micro-batch's ``L = (1-a) CE/N + a (KD_t2s + CE_t2s + KD_s2t)`` with the official denominators.

        Same vocabulary (dual_space_kd_v2.py): CE_t2s and KD_s2t over N; KD_t2s over the local agreeing
        count (masked) or N. ETA: CE_t2s over the mapped rows, KD_t2s over the agreeing (masked) or mapped
        rows, KD_s2t over the rows whose hidden states were copied (= mapped rows), all local.
        N is the global number of label tokens per micro-batch (``loss_denom``).
        """
        x = self.pieces(ids)
        n, has_label, agree = tokens_per_micro_batch, x["has_label"], x["agree"]
        local = lambda count: max(1e-3, float(count))  # noqa: E731  (the official max(1e-3, .) guard)
        if self.eta:
            ce_t2s = x["ce_t2s_rows"].sum() / local(has_label.sum())
            rows = agree if agreement_mask else has_label
            kd_t2s = (x["kd_t2s_rows"] * rows).sum() / local(rows.sum())
            kd_s2t = (x["kd_s2t_rows"] * has_label).sum() / local(has_label.sum())
        else:
            ce_t2s = x["ce_t2s_rows"].sum() / n
            if agreement_mask:
                kd_t2s = (x["kd_t2s_rows"] * agree).sum() / local(agree.sum())
            else:
                kd_t2s = x["kd_t2s_rows"].sum() / n
            kd_s2t = x["kd_s2t_rows"].sum() / n
        kd = {"both": kd_t2s + ce_t2s + kd_s2t, "student": kd_t2s + ce_t2s, "teacher": kd_s2t}[spaces]
        return (1 - ALPHA) * x["ce_sum"] / n + ALPHA * kd

    def global_loss(self, ids: list[int], *, agreement_mask: bool, spaces: str = "both") -> torch.Tensor:
        """The default: each term's sum over the whole batch divided by its global row count (CE: label
        rows; DSKD terms: aligned rows), one token mean however the batch is split."""
        x = self.pieces(ids)
        label_rows = sum(self.examples[i]["ids"].numel() - self.examples[i]["prompt_s"] for i in ids)
        aligned = x["has_label"].numel()
        kd_rows = x["kd_t2s_rows"] * x["agree"] if agreement_mask else x["kd_t2s_rows"]
        kd_t2s, ce_t2s, kd_s2t = kd_rows.sum(), x["ce_t2s_rows"].sum(), x["kd_s2t_rows"].sum()
        kd = {"both": kd_t2s + ce_t2s + kd_s2t, "student": kd_t2s + ce_t2s, "teacher": kd_s2t}[spaces]
        return (1 - ALPHA) * x["ce_sum"] / label_rows + ALPHA * kd / aligned


SPLIT = [[[0, 1], [2]], [[3, 4], [5]]]  # rank -> micro-batches -> example ids


def run_ours(world: World, kd: KDConfig, split, *, agreement_mask: bool):
    """The loop's per-step logic (counts before any forward, compute_terms, combine, DeepSpeed scaling)."""
    ranks, accum = len(split), len(split[0])
    global_counts: dict[str, float] = {}
    for rank in split:
        for ids in rank:
            batch, _, _ = world.batch(ids)
            for name, value in local_counts(kd, batch_rows(batch), batch).items():
                global_counts[name] = global_counts.get(name, 0.0) + float(value)
    grads, loss_total, hits = None, 0.0, 0.0
    for rank in split:
        for ids in rank:
            batch, student_hidden, teacher_hidden = world.batch(ids)
            rows = batch_rows(batch)
            terms = compute_terms(kd, rows, student_hidden, teacher_hidden, world.engines(),
                                  agreement_mask=agreement_mask, batch=batch)
            loss, metrics = combine(kd, terms, global_counts, world_size=ranks, grad_accum_steps=accum,
                                    agreement_mask=agreement_mask)
            (loss / accum).backward()  # DeepSpeed divides by the GA steps
            loss_total += float(metrics["loss"])
            hits += float(terms["t2s_agreement"][0])
        rank_grads = world.take_grads()
        grads = rank_grads if grads is None else [a + b for a, b in zip(grads, rank_grads, strict=True)]
    return [g / ranks for g in grads], loss_total, hits, global_counts


def run_official(world: World, split, *, agreement_mask: bool, spaces: str = "both"):
    ranks, accum = len(split), len(split[0])
    label_rows = sum(world.examples[i]["ids"].numel() - world.examples[i]["prompt_s"]
                     for rank in split for ids in rank for i in ids)
    tokens_per_micro_batch = label_rows / (ranks * accum)  # the official loss_denom
    grads, loss_total = None, 0.0
    for rank in split:
        for ids in rank:
            loss = world.official_loss(ids, tokens_per_micro_batch, agreement_mask=agreement_mask, spaces=spaces)
            (loss / accum).backward()
            loss_total += float(loss.detach()) / (ranks * accum)
        rank_grads = world.take_grads()
        grads = rank_grads if grads is None else [a + b for a, b in zip(grads, rank_grads, strict=True)]
    return [g / ranks for g in grads], loss_total


def assert_grads_close(ours, expected):
    for got, want in zip(ours, expected, strict=True):
        tol = reduction_tolerance(torch.float32, CHAIN, scale=float(want.abs().max()) + 1.0)
        torch.testing.assert_close(got.double(), want.double(), **tol)


@pytest.mark.parametrize("eta", [False, True])
@pytest.mark.parametrize("agreement_mask", [True, False])
def test_official_normalization_matches_the_official_formulas(eta, agreement_mask):
    world = World(eta=eta)
    kd = KDConfig(criterion="dskd_eta" if eta else "dskd", alpha=ALPHA, temperature=TAU, chunk_size=3,
                  normalization="official")
    ours, our_loss, hits, counts = run_ours(world, kd, SPLIT, agreement_mask=agreement_mask)
    expected, expected_loss = run_official(world, SPLIT, agreement_mask=agreement_mask)
    assert 0 < hits < counts["kd_t2s"], "the set-up must have agreeing and disagreeing rows"
    assert our_loss == pytest.approx(expected_loss, rel=reduction_tolerance(torch.float32, CHAIN)["rtol"])
    assert_grads_close(ours, expected)
    if not eta and not agreement_mask:
        return  # same vocabulary, unmasked: the official formulas divide every term by N, i.e. are global
    # The official normalisation differs from the default one on this split (the test can tell them apart).
    default, _, _, _ = run_ours(world, KDConfig(criterion=kd.criterion, alpha=ALPHA, temperature=TAU, chunk_size=3),
                                SPLIT, agreement_mask=agreement_mask)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(default, expected, strict=True))


@pytest.mark.parametrize("eta", [False, True])
@pytest.mark.parametrize("spaces", ["both", "student", "teacher"])
def test_global_normalization_spaces_and_split_invariance(eta, spaces):
    """Default normalisation: every term a token mean over the global batch, whatever the split; kd.spaces
    keeps only that space's KD terms."""
    world = World(eta=eta, seed=1)
    kd = KDConfig(criterion="dskd_eta" if eta else "dskd", alpha=ALPHA, temperature=TAU, chunk_size=2, spaces=spaces)
    split, _, _, _ = run_ours(world, kd, SPLIT, agreement_mask=True)
    whole, whole_loss, _, _ = run_ours(world, kd, [[list(range(6))]], agreement_mask=True)
    expected_loss = world.global_loss(list(range(6)), agreement_mask=True, spaces=spaces)
    expected_loss.backward()
    expected = world.take_grads()
    rtol = reduction_tolerance(torch.float32, CHAIN)["rtol"]
    assert whole_loss == pytest.approx(float(expected_loss.detach()), rel=rtol)
    assert_grads_close(whole, expected)
    assert_grads_close(split, expected)
    if spaces == "teacher":  # ce_t2s is the projector's only loss: no student-space term, no projector gradient
        assert float(whole[3].abs().max()) == 0.0
    else:
        assert float(whole[3].abs().max()) > 0.0


def test_agreement_switch_reaches_the_loss():
    """The loop's switch: last step's global agreement ratio vs kd.t2s_agreement_threshold decides the mask."""
    world = World(eta=True, seed=2)
    kd = KDConfig(criterion="dskd_eta", alpha=ALPHA, temperature=TAU, chunk_size=4)
    _, masked_loss, hits, counts = run_ours(world, kd, SPLIT, agreement_mask=True)
    ratio = hits / counts["kd_t2s"]
    assert 0 < ratio < 1
    assert use_t2s_agreement_mask(hits, counts["kd_t2s"], threshold=1.0) is True  # the paper's default
    switch = use_t2s_agreement_mask(hits, counts["kd_t2s"], threshold=ratio / 2)
    assert switch is False
    grads, unmasked_loss, _, _ = run_ours(world, kd, SPLIT, agreement_mask=switch)
    expected_loss = world.global_loss(list(range(6)), agreement_mask=False)
    expected_loss.backward()
    rtol = reduction_tolerance(torch.float32, CHAIN)["rtol"]
    assert unmasked_loss == pytest.approx(float(expected_loss.detach()), rel=rtol)
    assert unmasked_loss > masked_loss  # more rows in kd_t2s
    assert_grads_close(grads, world.take_grads())


def test_config_keys_are_checked():
    assert KDConfig(spaces="student", normalization="official").problems() == []
    problems = KDConfig(spaces="neither", normalization="local").problems()
    assert any("kd.spaces must be" in p for p in problems) and any("kd.normalization must be" in p for p in problems)
    assert any("apply to dskd/dskd_eta only" in p for p in KDConfig(criterion="uld", spaces="teacher").problems())


@pytest.mark.parametrize("criterion", ["sft", "vanilla_kd", "uld", "mined", "dskd", "dskd_eta"])
def test_head_grad_weights_are_the_derivatives_of_the_combined_loss(criterion):
    """The fused student head is told d(loss)/d(term sum) before the forward; combine must then use exactly
    those weights, or every chunk is recomputed in the backward."""
    from dskd_scale.criteria import head_grad_weights

    kd = KDConfig(criterion=criterion, alpha=ALPHA)
    counts = {"ce": 40, "kd": 31, "kd_t2s": 25, "ce_t2s": 25, "kd_s2t": 25}
    sums = {name: torch.tensor(1.5, requires_grad=True) for name in counts}
    terms = {name: (value, torch.tensor(counts[name])) for name, value in sums.items()}
    loss, _ = combine(kd, terms, counts, world_size=2, grad_accum_steps=3)
    loss.backward()
    weights = head_grad_weights(kd, counts, world_size=2, grad_accum_steps=3)
    used = {name: float(value.grad) for name, value in sums.items() if value.grad is not None and value.grad != 0}
    assert set(weights) == set(used), f"weights for {sorted(weights)}, loss uses {sorted(used)}"
    for name, weight in weights.items():
        assert weight == pytest.approx(used[name], rel=1e-6), name
