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

``kd.normalization=official`` reproduces the official DSKD code instead (``official_local_counts``): some
terms are divided by their own LOCAL count of this micro-batch (agreeing or mapped rows) and enter as
that micro-batch's mean, which DeepSpeed then averages over ranks and micro-batches. That is not a token
mean (a micro-batch with few agreeing rows weighs as much as one with many); it exists to reproduce the
paper's numbers. ``global`` stays the default.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "KD_TERMS_BY_SPACE",
    "NORMALIZATIONS",
    "combine_terms",
    "data_counts",
    "official_local_counts",
    "term_weights",
    "use_t2s_agreement_mask",
]

KD_TERMS_BY_SPACE = {
    "both": ("kd_t2s", "ce_t2s", "kd_s2t"),
    "student": ("kd_t2s", "ce_t2s"),
    "teacher": ("kd_s2t",),
}

NORMALIZATIONS = ("global", "official")

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
    local_counts: Mapping[str, Count] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Combine local term sums into the scalar to pass to ``engine.backward``.

    Args:
        terms: ``{name: (local_sum, local_count)}`` from ``student_ce`` (as ``"ce"``) and ``dskd_loss``.
        global_counts: ``{name: global count}`` for every loss term used (see ``data_counts``).
        alpha: KD weight in [0, 1]; ``alpha == 0`` needs no KD terms, ``alpha == 1`` no ``ce``.
        world_size: data-parallel world size that DeepSpeed averages gradients over.
        grad_accum_steps: DeepSpeed's gradient accumulation steps (it divides the loss by this).
        spaces: "both", "student" or "teacher": which KD terms enter the total.
        local_counts: terms normalised by their own count in THIS micro-batch instead of the global one
            (``official_local_counts``; empty/None is the default global normalisation).

    Returns:
        ``(loss_to_backward, metrics)``. ``metrics`` holds detached fp32 scalars: for every term with a
        global count, this rank's contribution ``local_sum / global_count`` (``local_sum / local_count``
        divided by ``world_size * grad_accum_steps`` for a locally normalised term), so summing a metric
        over ranks and micro-batches gives its step value, and ``"loss"``, the contribution to the total.
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

    local_counts = local_counts or {}
    scale = world_size * grad_accum_steps

    def share(name: str, loss_sum: Tensor) -> Tensor:
        """This micro-batch's share of the step value of a term (summed over ranks and the GA window)."""
        if name in local_counts:
            count = torch.as_tensor(local_counts[name], dtype=torch.float32, device=loss_sum.device)
            return loss_sum.float() / count.clamp_min(1.0) / scale  # 0 rows: the sum is 0, so is the term
        return _global_mean(name, loss_sum, global_counts)

    means = {name: share(name, terms[name][0]) for name in needed}
    total = sum((means[name] for name in needed if name != "ce"), start=torch.zeros(()))
    total = alpha * total
    if "ce" in means:
        total = total + (1.0 - alpha) * means["ce"]

    metrics = {
        name: share(name, value[0]).detach()
        for name, value in terms.items()
        if name in global_counts or name in local_counts
    }
    metrics["loss"] = total.detach()
    return total * scale, metrics


def term_weights(
    global_counts: Mapping[str, Count],
    *,
    alpha: float,
    world_size: int,
    grad_accum_steps: int,
    spaces: str = "both",
    local_terms: tuple[str, ...] = (),
    kd_terms: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """``d(loss_to_backward) / d(local_sum)`` of every globally normalised term ``combine_terms`` would use.

    Known before the forward (the global counts are), so a ``TrainableHead`` can accumulate the weight
    gradient already weighted (``chunked.fused_head_chunk``). Terms in ``local_terms`` (official
    normalisation) are left out: their count is known only after the forward. ``kd_terms`` names the terms
    under ``alpha`` when they are not DSKD's (``KD_TERMS_BY_SPACE[spaces]``), e.g. a baseline's ``("kd",)``.
    """
    scale = world_size * grad_accum_steps
    weights: dict[str, float] = {}
    if alpha < 1.0 and "ce" in global_counts:
        weights["ce"] = (1.0 - alpha) / max(float(global_counts["ce"]), 1.0) * scale
    if alpha > 0.0:
        for name in KD_TERMS_BY_SPACE[spaces] if kd_terms is None else kd_terms:
            if name in global_counts and name not in local_terms:
                weights[name] = alpha / max(float(global_counts[name]), 1.0) * scale
    return weights


def official_local_counts(
    terms: Mapping[str, tuple[Tensor, Tensor]], *, eta: bool, agreement_mask: bool
) -> dict[str, Tensor]:
    """Denominators of the official DSKD v2 code that are local to the micro-batch (anchor sections 1.4, 2.4).

    Same vocabulary (``dual_space_kd_v2.py``): only a masked ``kd_t2s`` is a local mean, over the agreeing
    rows; ``ce_t2s``, ``kd_s2t`` and an unmasked ``kd_t2s`` divide by the global count per micro-batch, as
    here. ETA (``..._with_exact_token_alignment.py``): ``ce_t2s`` over the mapped rows, ``kd_t2s`` over the
    agreeing (masked) or mapped (unmasked) rows, ``kd_s2t`` over the rows with copied hidden states, which
    are the mapped rows too (``dskd_loss`` with ``mapped_rows_only``). The counts are the hit counts
    ``dskd_loss`` returns (``t2s_agreement``, ``t2s_label_coverage``); the student CE always stays global.
    """
    agreeing, mapped = terms["t2s_agreement"][0], terms["t2s_label_coverage"][0]
    local: dict[str, Tensor] = {}
    if agreement_mask:
        local["kd_t2s"] = agreeing
    elif eta:
        local["kd_t2s"] = mapped
    if eta:
        local["ce_t2s"] = mapped
        local["kd_s2t"] = mapped
    return local


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
