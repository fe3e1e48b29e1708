"""Turn per-rank ``(sum, count)`` loss terms into the scalar DeepSpeed should backpropagate.

Maths only; the engine runs the collectives. The contract:

- every term's denominator is its GLOBAL count: summed over data-parallel ranks and over every
  micro-batch of the gradient-accumulation window, all-reduced by the engine before the first backward
  (``data_counts`` lists what to count; all of it is known from the batch before any forward);
- DeepSpeed averages gradients over ranks and divides the loss by ``gradient_accumulation_steps``, so the
  combined loss is multiplied by ``world_size * grad_accum_steps`` to undo both.

Together, the gradient applied at the optimizer step equals the gradient of the token mean over the whole
global batch, however it is split into ranks and micro-batches:
``total = (1 - alpha) * CE + alpha * (KD_t2s + CE_t2s + KD_s2t)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["KD_TERMS_BY_SPACE", "combine_terms", "data_counts", "use_t2s_agreement_mask"]

KD_TERMS_BY_SPACE = {
    "both": ("kd_t2s", "ce_t2s", "kd_s2t"),
    "student": ("kd_t2s", "ce_t2s"),
    "teacher": ("kd_s2t",),
}

Count = Tensor | int | float


def data_counts(num_label_tokens: Count, num_aligned_rows: Count) -> dict[str, Count]:
    """Local counts to all-reduce (SUM over ranks and the GA window) into ``global_counts``.

    ``ce`` counts label tokens (``labels != -100`` after the shift); every DSKD term, and the DSKD metrics,
    count aligned rows (``len(align_student)``), matching the counts ``dskd_loss`` returns.
    """
    counts: dict[str, Count] = {"ce": num_label_tokens}
    for name in (
        "kd_t2s",
        "ce_t2s",
        "kd_s2t",
        "t2s_agreement",
        "t2s_label_coverage",
        "s2t_acc",
        "student_teacher_agreement",
    ):
        counts[name] = num_aligned_rows
    return counts


def _global_mean(name: str, loss_sum: Tensor, global_counts: Mapping[str, Count]) -> Tensor:
    if name not in global_counts:
        raise KeyError(f"global_counts has no entry for loss term {name!r} (have {sorted(global_counts)})")
    count = torch.as_tensor(global_counts[name], dtype=torch.float32, device=loss_sum.device)
    # An empty term (no aligned rows anywhere in the window) contributes 0, not 0/0.
    return loss_sum.float() / count.clamp_min(1.0)


def combine_terms(
    terms: Mapping[str, tuple[Tensor, Tensor]],
    global_counts: Mapping[str, Count],
    *,
    alpha: float,
    world_size: int,
    grad_accum_steps: int,
    spaces: str = "both",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Combine local term sums into the scalar to pass to ``engine.backward``.

    Args:
        terms: ``{name: (local_sum, local_count)}`` from ``student_ce`` (as ``"ce"``) and ``dskd_loss``.
        global_counts: ``{name: global count}`` for every loss term used (see ``data_counts``).
        alpha: KD weight in [0, 1]; ``alpha == 0`` needs no KD terms, ``alpha == 1`` no ``ce``.
        world_size: data-parallel world size that DeepSpeed averages gradients over.
        grad_accum_steps: DeepSpeed's gradient accumulation steps (it divides the loss by this).
        spaces: "both", "student" or "teacher": which KD terms enter the total.

    Returns:
        ``(loss_to_backward, metrics)``. ``metrics`` holds detached fp32 scalars: for every term with a
        global count, this rank's contribution ``local_sum / global_count`` (summing a metric over ranks and
        micro-batches gives its global mean), and ``"loss"``, the contribution to the total.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if spaces not in KD_TERMS_BY_SPACE:
        raise ValueError(f"spaces must be one of {sorted(KD_TERMS_BY_SPACE)}, got {spaces!r}")
    if world_size < 1 or grad_accum_steps < 1:
        raise ValueError(f"world_size and grad_accum_steps must be >= 1, got {world_size}, {grad_accum_steps}")

    needed = (["ce"] if alpha < 1.0 else []) + (list(KD_TERMS_BY_SPACE[spaces]) if alpha > 0.0 else [])
    missing = [name for name in needed if name not in terms]
    if missing:
        raise KeyError(f"combine_terms needs terms {missing} (alpha={alpha}, spaces={spaces!r}); got {sorted(terms)}")

    means = {name: _global_mean(name, terms[name][0], global_counts) for name in needed}
    total = sum((means[name] for name in needed if name != "ce"), start=torch.zeros(()))
    total = alpha * total
    if "ce" in means:
        total = total + (1.0 - alpha) * means["ce"]

    metrics = {
        name: _global_mean(name, value[0], global_counts).detach()
        for name, value in terms.items()
        if name in global_counts
    }
    metrics["loss"] = total.detach()
    return total * (world_size * grad_accum_steps), metrics


def use_t2s_agreement_mask(global_agreeing: Count, global_rows: Count, threshold: float) -> bool:
    """The paper's threshold rule, made well-defined: mask kd_t2s iff agreement ratio <= threshold.

    The anchor decides per micro-batch from a ratio whose denominator is an average, so it can exceed 1
    and flip the branch at random. Here the ratio is the GLOBAL fraction of aligned rows whose projected
    argmax equals the mapped teacher argmax, measured on the previous optimizer step (all-reduced
    ``t2s_agreement`` hits / rows), and the result holds for the whole next step on every rank. With no
    rows yet, or ``threshold >= 1`` (the paper's default), the mask is used.
    """
    rows = float(global_rows)
    if rows <= 0:
        return True
    return float(global_agreeing) / rows <= threshold
