"""Naive full-logit references (the anchor's way), written independently of the code under test."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_forward_kl_rows(student_logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    log_q = F.log_softmax(student_logits.double() / temperature, -1)
    log_p = F.log_softmax(target_logits.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def naive_dskd(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    projector_weight: Tensor,
    s2t_fn,
    id_map: Tensor,
    *,
    temperature: float = 1.0,
    agreement_mask: bool = True,
    labels: Tensor | None = None,
) -> dict[str, Tensor]:
    """All four logit tensors over every row at once, forward KL, sums (no normalisation)."""
    teacher_hidden = teacher_hidden.detach()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
        teacher_pred = teacher_logits.argmax(-1)
        known = teacher_pred < id_map.numel()
        mapped = torch.where(known, id_map[teacher_pred.clamp(max=id_map.numel() - 1)], -1)
    projected = teacher_hidden @ projector_weight.T
    t2s_logits = projected @ student_weight.detach().T
    ce_t2s = F.cross_entropy(t2s_logits.double(), mapped, ignore_index=-1, reduction="sum")
    agree = (t2s_logits.argmax(-1) == mapped) & (mapped >= 0)
    student_logits = student_hidden @ student_weight.T
    kd_rows = naive_forward_kl_rows(student_logits, t2s_logits.detach(), temperature)
    kd_t2s = (kd_rows * agree).sum() if agreement_mask else kd_rows.sum()
    s2t_logits = s2t_fn(student_hidden) @ teacher_weight.detach().T
    kd_s2t = naive_forward_kl_rows(s2t_logits, teacher_logits, temperature).sum()
    out = {"kd_t2s": kd_t2s, "ce_t2s": ce_t2s, "kd_s2t": kd_s2t, "agree": agree.sum(), "mapped": (mapped >= 0).sum()}
    if labels is not None:
        out["ce"] = F.cross_entropy(student_logits.double(), labels, ignore_index=-100, reduction="sum")
    return out
