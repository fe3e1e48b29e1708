"""Naive full-logit references (the anchor's way), written independently of the code under test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_forward_kl_rows(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """KL(p || q) per row, p = softmax(target / tau), q = softmax(student / tau), in fp64 (anchor section 1.6)."""
    log_q = F.log_softmax(student_logits.double() / temperature, -1)
    log_p = F.log_softmax(target_logits.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def pinv_s2t_matrix(teacher_rows: Tensor, student_rows: Tensor) -> Tensor:
    """Q = pinv(W_t^O) W_s^O in fp64 (anchor section 1.2): the minimum-norm least-squares solution (SVD
    driver), not our projector code."""
    return torch.linalg.lstsq(teacher_rows.detach().double(), student_rows.detach().double(), driver="gelsd").solution


def naive_dskd(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    projector_weight: Tensor,
    s2t_matrix: Tensor,
    id_map: Tensor,
    *,
    temperature: float = 1.0,
    agreement_mask: bool = True,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """DSKD v2 sums from the equations of anchor section 1.4: four full logit tensors over every row, fp64.

    ``s2t_matrix`` is Q ``[E, D]`` (``pinv_s2t_matrix`` or a learned weight); ``id_map`` maps teacher ids to
    student ids, ``-1`` (and any id beyond the map) meaning "no counterpart". Gradients flow to the fp32
    leaves through the fp64 casts.
    """
    student_hidden, teacher_hidden = student_hidden.double(), teacher_hidden.detach().double()
    student_weight, teacher_weight = student_weight.double(), teacher_weight.detach().double()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
        teacher_pred = teacher_logits.argmax(-1)
        known = teacher_pred < id_map.numel()
        mapped = torch.where(known, id_map[teacher_pred.clamp(max=id_map.numel() - 1)], -1)
    t2s_logits = (teacher_hidden @ projector_weight.double().T) @ student_weight.detach().T
    ce_t2s = F.cross_entropy(t2s_logits, mapped, ignore_index=-1, reduction="sum")
    agree = (t2s_logits.argmax(-1) == mapped) & (mapped >= 0)
    student_logits = student_hidden @ student_weight.T
    kd_rows = naive_forward_kl_rows(student_logits, t2s_logits.detach(), temperature)
    kd_t2s = (kd_rows * agree).sum() if agreement_mask else kd_rows.sum()
    s2t_logits = (student_hidden @ s2t_matrix.double().T) @ teacher_weight.T
    kd_s2t = naive_forward_kl_rows(s2t_logits, teacher_logits, temperature).sum()
    out = {"kd_t2s": kd_t2s, "ce_t2s": ce_t2s, "kd_s2t": kd_s2t, "agree": agree.sum(), "mapped": (mapped >= 0).sum()}
    if labels is not None:
        out["ce"] = F.cross_entropy(student_logits, labels, ignore_index=-100, reduction="sum")
    return out


class TinyDistillation:
    """A tiny student (linear body + head), a t2s projector and a fixed teacher, with ragged examples.

    Every example has ``n`` label rows (some ignored) and a subset of ``a`` aligned rows, so the CE and the
    DSKD terms have different counts, as with ETA. Used by the token-mean invariance tests.
    """

    IN, D, E, V, W = 5, 6, 8, 13, 11

    def __init__(self, seed: int = 0, num_examples: int = 7):
        from dskd_scale.projectors import PinvS2TMap, T2SProjector

        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.body = torch.nn.Linear(self.IN, self.D)
        self.head = torch.nn.Linear(self.D, self.V, bias=False)
        self.teacher_weight = torch.randn(self.W, self.E, generator=gen)
        self.id_map = torch.randint(-1, self.V, (self.W,), generator=gen)
        overlap = torch.arange(9)
        self.projector = T2SProjector(self.E, self.D).init_ideal_(
            self.head.weight[overlap], self.teacher_weight[overlap]
        )
        self.s2t = PinvS2TMap(self.teacher_weight[overlap], overlap)
        self.s2t.rebuild(self.head.weight)
        self.examples = []
        for _ in range(num_examples):
            n = int(torch.randint(2, 7, (1,), generator=gen))
            labels = torch.randint(0, self.V, (n,), generator=gen)
            labels[torch.rand(n, generator=gen) < 0.25] = -100
            aligned = torch.nonzero(torch.rand(n, generator=gen) < 0.7).flatten()
            self.examples.append(
                {
                    "x": torch.randn(n, self.IN, generator=gen),
                    "labels": labels,
                    "aligned": aligned,
                    "teacher_hidden": torch.randn(aligned.numel(), self.E, generator=gen),
                }
            )

    def params(self) -> list[torch.nn.Parameter]:
        return [*self.body.parameters(), self.head.weight, self.projector.weight]

    def local_counts(self, examples) -> dict:
        from dskd_scale.losses import data_counts

        labels = sum(int((ex["labels"] != -100).sum()) for ex in examples)
        return data_counts(labels, sum(int(ex["aligned"].numel()) for ex in examples))

    def terms(self, examples, chunk_size: int = 4) -> dict:
        from dskd_scale.losses import DSKDOptions, dskd_loss, student_ce

        offsets, start = [], 0
        for ex in examples:
            offsets.append(ex["aligned"] + start)
            start += ex["x"].shape[0]
        hidden = self.body(torch.cat([ex["x"] for ex in examples]))
        terms = {
            "ce": student_ce(hidden, torch.cat([ex["labels"] for ex in examples]), self.head, chunk_size=chunk_size)
        }
        terms.update(
            dskd_loss(
                hidden[torch.cat(offsets)],
                torch.cat([ex["teacher_hidden"] for ex in examples]),
                student_head=self.head,
                student_head_frozen=lambda h: F.linear(h, self.head.weight.detach()),
                teacher_head=lambda h: F.linear(h, self.teacher_weight),
                t2s_projector=self.projector,
                s2t_map=self.s2t,
                teacher_to_student_ids=self.id_map,
                options=DSKDOptions(chunk_size=chunk_size, temperature=2.0),
            )
        )
        return terms

    def take_grads(self) -> list[Tensor]:
        grads = [p.grad.clone() for p in self.params()]
        for p in self.params():
            p.grad = None
        return grads
