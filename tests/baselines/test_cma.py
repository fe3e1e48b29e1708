"""DSKD-CMA: gradient reaches every projector and never the teacher; padding and prompts have no influence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dskd_scale.losses.baselines import build_cma_projectors, cma_attention, cma_loss

D, E, V, W = 4, 5, 11, 13  # student/teacher hidden (= embedding widths) and head rows


class Tiny(torch.nn.Module):
    """Embedding + one linear "body": enough to check where gradients go."""

    def __init__(self, vocab: int, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width).double()
        self.body = torch.nn.Linear(width, width).double()
        self.head = torch.nn.Linear(width, vocab, bias=False).double()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(self.embed(ids)))


def setup():
    student, teacher = Tiny(V, D, 0), Tiny(W, E, 1)  # teacher params keep requires_grad: it must still get none
    torch.manual_seed(2)
    projectors = build_cma_projectors(D, E, D, E).double()
    batch = {
        "student_input_ids": torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 0, 0]]),
        "student_labels": torch.tensor([[-100, -100, 3, 4, 5, 6], [-100, 8, 9, 10, -100, -100]]),
        "teacher_input_ids": torch.tensor([[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 11, 12]]),
        "teacher_labels": torch.tensor([[-100, 2, 3, 4, 5, -100, -100], [-100, -100, -100, 9, 10, 11, 12]]),
    }
    return student, teacher, projectors, batch


def loss_terms(student, teacher, projectors, batch, chunk_size=3, student_hidden=None):
    student_hidden = student(batch["student_input_ids"]) if student_hidden is None else student_hidden
    teacher_hidden = teacher(batch["teacher_input_ids"])  # built with graph on purpose
    frozen_head = lambda h: F.linear(h, student.head.weight.detach())
    return cma_loss(
        student_hidden,
        teacher_hidden,
        student_input_ids_BS=batch["student_input_ids"],
        student_labels_BS=batch["student_labels"],
        teacher_input_ids_BT=batch["teacher_input_ids"],
        teacher_labels_BT=batch["teacher_labels"],
        student_embed=student.embed,
        teacher_embed=teacher.embed,
        projectors=projectors,
        student_head=student.head,
        student_head_frozen=frozen_head,
        teacher_head=teacher.head,
        chunk_size=chunk_size,
    )


def total(terms):
    return terms["kd_t2s"][0] + terms["ce_t2s"][0] + terms["kd_s2t"][0]


def test_every_projector_gets_gradient_and_the_teacher_none():
    student, teacher, projectors, batch = setup()
    terms = loss_terms(student, teacher, projectors, batch)
    total(terms).backward()
    for name in ("query", "t2s", "s2t"):
        for param in projectors[name].parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert student.body.weight.grad.abs().sum() > 0 and student.head.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # Term-wise isolation: ce_t2s trains query and t2s, never s2t or the student head; kd_s2t never t2s.
    for name, trained, untouched in (("ce_t2s", ("query", "t2s"), ("s2t",)), ("kd_s2t", ("query", "s2t"), ("t2s",))):
        student, teacher, projectors, batch = setup()
        loss_terms(student, teacher, projectors, batch)[name][0].backward()
        assert all(projectors[t].weight.grad.abs().sum() > 0 for t in trained), name
        assert all(projectors[u].weight.grad is None for u in untouched), name
        assert student.head.weight.grad is None, name
    assert int(terms["kd_t2s"][1]) == 7 and int(terms["kd_s2t"][1]) == 8  # response rows: 4+3 and 4+4


def test_masked_positions_have_no_influence():
    student, teacher, projectors, batch = setup()
    hidden = student(batch["student_input_ids"]).detach().requires_grad_(True)
    terms = loss_terms(student, teacher, projectors, batch, student_hidden=hidden)
    reference = total(terms)
    reference.backward()
    # Predicting rows of the student: positions 1..4 (example 0) and 0..2 (example 1); the rest is prompt/padding.
    used = torch.zeros(2, 6, dtype=torch.bool)
    used[0, 1:5], used[1, 0:3] = True, True
    assert torch.all(hidden.grad[~used] == 0) and hidden.grad[used].abs().sum() > 0

    changed = {k: v.clone() for k, v in batch.items()}
    changed["student_input_ids"][1, 4:] = 3  # student padding ids
    changed["teacher_input_ids"][0, 5:] = 12  # teacher padding ids
    changed["teacher_input_ids"][1, 0:2] = 4  # teacher prompt ids (positions 0, 1 only feed prompt rows)
    hidden2 = hidden.detach().clone()
    hidden2[~used] = torch.randn(int((~used).sum()), D, dtype=torch.float64) * 1e3
    again = total(loss_terms(student, teacher, projectors, changed, student_hidden=hidden2))
    torch.testing.assert_close(again, reference.detach())


def test_chunked_equals_unchunked():
    results = []
    for chunk in (1, 100):
        student, teacher, projectors, batch = setup()
        terms = loss_terms(student, teacher, projectors, batch, chunk_size=chunk)
        total(terms).backward()
        grads = [p.grad.clone() for p in list(projectors.parameters()) + list(student.parameters())]
        results.append(([terms[k][0].detach() for k in ("kd_t2s", "ce_t2s", "kd_s2t")], grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_attention_matches_a_per_example_reference_without_padding():
    student, teacher, projectors, batch = setup()
    with torch.no_grad():
        h_s, h_t = student(batch["student_input_ids"]), teacher(batch["teacher_input_ids"])
        out = cma_attention(
            h_s,
            h_t,
            student_input_ids_BS=batch["student_input_ids"],
            student_labels_BS=batch["student_labels"],
            teacher_input_ids_BT=batch["teacher_input_ids"],
            teacher_labels_BT=batch["teacher_labels"],
            student_embed=student.embed,
            teacher_embed=teacher.embed,
            projectors=projectors,
        )
        spans = {"s": [(1, 5), (0, 3)], "t": [(0, 4), (2, 6)]}  # predicting positions of the response, per example
        tid, tlab = batch["teacher_input_ids"], batch["teacher_labels"]
        t_index = torch.cat(
            [
                torch.cat([teacher.embed(tid[b, i:j]), teacher.embed(tlab[b, i + 1 : j + 1])], -1)
                for b, (i, j) in enumerate(spans["t"])
            ]
        )
        t_next = torch.cat([teacher.embed(tlab[b, i + 1 : j + 1]) for b, (i, j) in enumerate(spans["t"])])
        t_hidden = torch.cat([h_t[b, i:j] for b, (i, j) in enumerate(spans["t"])])
        key_std, next_std, hid_std = t_index.std(), t_next.std(), t_hidden.std()
        expected_t2s, expected_s2t = [], []
        for b in range(2):
            (si, sj), (ti, tj) = spans["s"][b], spans["t"][b]
            sid, slab = batch["student_input_ids"][b], batch["student_labels"][b]
            q = projectors["query"](torch.cat([student.embed(sid[si:sj]), student.embed(slab[si + 1 : sj + 1])], -1))
            k = torch.cat([teacher.embed(tid[b, ti:tj]), teacher.embed(tlab[b, ti + 1 : tj + 1])], -1) / key_std
            scores = q @ k.T / math.sqrt(2 * E)
            v_t = projectors["t2s"](h_t[b, ti:tj] / hid_std + teacher.embed(tlab[b, ti + 1 : tj + 1]) / next_std)
            expected_t2s.append(torch.softmax(scores, 1) @ v_t)
            expected_s2t.append(torch.softmax(scores, 0).T @ projectors["s2t"](h_s[b, si:sj]))
    torch.testing.assert_close(out["t2s_hidden_ND"], torch.cat(expected_t2s))
    torch.testing.assert_close(out["s2t_hidden_ME"], torch.cat(expected_s2t))
