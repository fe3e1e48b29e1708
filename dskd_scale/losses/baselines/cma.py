"""DSKD v1 with Cross-Model Attention (CMA, arXiv 2406.17328 §3), the cross-vocabulary baseline "DSKD-CMA".

Shape legend: ``B`` batch, ``S``/``T`` student/teacher positions (predicting positions: the last position of
each padded row is dropped), ``D``/``E`` student/teacher hidden, ``F``/``G`` student/teacher embedding widths,
``N``/``M`` flat student/teacher response rows, ``C`` rows of one chunk, ``V``/``W`` head rows.

Position ``i`` of a row predicts ``labels[i + 1]`` (Contract 2 labels are not shifted). Its *index embedding* is
``[E(x_i); E(y_i)]`` (input token, next token; both detached input-embedding rows), which identifies "the same
place" across tokenisations. With ``std`` taken over response positions only:

- query ``q_i = W_q [E_s(x_i); E_s(y_i)]`` (``query``: Linear(2F, 2G)); key ``k_j = [E_t(x_j); E_t(y_j)] / std``;
- ``A_ij = q_i . k_j / sqrt(2G)`` over response pairs of the same example only;
- t2s: ``h~_i = sum_j softmax_j(A_i.) P_t2s(h_t_j / std + E_t(y_j) / std)``; ``z_t2s = sg(W_s) h~_i``;
- s2t: ``h~_j = sum_i softmax_i(A_.j) P_s2t(h_s_i)``; ``z_s2t = sg(W_t) h~_j``.

Terms (same names as DSKD v2, so ``combine_terms`` treats both alike):

- ``ce_t2s`` = CE(z_t2s, gold y): trains ``query`` and ``t2s`` (not the student head: frozen copy);
- ``kd_t2s`` = D(target = sg(z_t2s), student = W_s h_s), only where argmax z_t2s == y (v1 mask): trains the student;
- ``kd_s2t`` = D(target = W_t h_t, student = z_s2t): trains ``s2t``, ``query`` and the student body.

Fixes against the anchor (§9.2): every projector is a module the caller registers with the optimizer (bug 7;
``build_cma_projectors`` returns them under stable names, bug 26), embeddings come in as callables instead of
attribute sniffing that breaks on GPT-2 teachers (bug 27), padding cannot influence the result (stds over response
positions, masked keys get exactly zero weight, fully masked rows are dropped), the s2t divergence follows the
configured one (v1 hard-codes forward KL, bug 35), and vocabulary-sized logits exist one chunk at a time.
Counts: ``kd_t2s``/``ce_t2s`` = N (student response rows of examples with a teacher response), ``kd_s2t`` = M.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dskd_scale.losses.chunked import HeadFn, eager_input_grad, recomputed_chunk, split_rows
from dskd_scale.losses.divergences import DivergenceParams, RowDivergence, at_least_fp32, resolve_divergence

__all__ = ["CMA_PROJECTORS", "build_cma_projectors", "cma_attention", "cma_loss", "cma_row_counts"]

CMA_PROJECTORS = ("query", "t2s", "s2t")
EmbedFn = Callable[[Tensor], Tensor]  # ids [B, L] -> input-embedding rows [B, L, F]


def build_cma_projectors(
    student_hidden: int, teacher_hidden: int, student_embed: int, teacher_embed: int
) -> nn.ModuleDict:
    """The three trainable CMA projectors (v1 shapes, with bias): ``query`` (2F -> 2G), ``t2s`` (E -> D),
    ``s2t`` (D -> E). All three must go into the optimizer (projector parameter group)."""
    return nn.ModuleDict(
        {
            "query": nn.Linear(2 * student_embed, 2 * teacher_embed),
            "t2s": nn.Linear(teacher_hidden, student_hidden),
            "s2t": nn.Linear(student_hidden, teacher_hidden),
        }
    )


def _predicting(input_ids_BL: Tensor, labels_BL: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input ids, next ids, response mask) of the predicting positions 0..L-2; masked ids read 0."""
    next_ids = labels_BL[:, 1:]
    mask = next_ids != ignore_index
    return torch.where(mask, input_ids_BL[:, :-1], 0), torch.where(mask, next_ids, 0), mask


def _masked_std(values_BLX: Tensor, mask_BL: Tensor) -> Tensor:
    """Scalar std of the entries of response positions (as the anchor's global ``.std()``, minus padding)."""
    picked = values_BLX[mask_BL]
    if picked.numel() < 2:
        return values_BLX.new_ones(())
    return at_least_fp32(picked).std().clamp_min(1e-6)


def cma_row_counts(student_labels_BS: Tensor, teacher_labels_BT: Tensor, ignore_index: int = -100) -> tuple[int, int]:
    """(N, M): student / teacher response rows of examples where both sides have a response (known pre-forward)."""
    student_mask = student_labels_BS[:, 1:] != ignore_index
    teacher_mask = teacher_labels_BT[:, 1:] != ignore_index
    both = student_mask.any(1) & teacher_mask.any(1)
    return int(student_mask[both].sum()), int(teacher_mask[both].sum())


def cma_attention(
    student_hidden_BSD: Tensor,
    teacher_hidden_BTE: Tensor,
    *,
    student_input_ids_BS: Tensor,
    student_labels_BS: Tensor,
    teacher_input_ids_BT: Tensor,
    teacher_labels_BT: Tensor,
    student_embed: EmbedFn,
    teacher_embed: EmbedFn,
    projectors: nn.ModuleDict,
    ignore_index: int = -100,
) -> dict[str, Tensor]:
    """The CMA attention maths on padded tensors (Contract 2 layout, full length ``S``/``T`` as the models see).

    Returns flat rows: ``student_hidden_ND``, ``t2s_hidden_ND``, ``labels_N`` (gold next ids),
    ``s2t_hidden_ME``, ``teacher_hidden_ME`` (detached), plus ``t2s_weights_BST`` for inspection.
    """
    student_x, student_y, student_mask = _predicting(student_input_ids_BS, student_labels_BS, ignore_index)
    teacher_x, teacher_y, teacher_mask = _predicting(teacher_input_ids_BT, teacher_labels_BT, ignore_index)
    both = student_mask.any(1) & teacher_mask.any(1)
    student_mask = student_mask & both[:, None]
    teacher_mask = teacher_mask & both[:, None]
    h_s = student_hidden_BSD[:, :-1]
    dtype_of = {name: next(projectors[name].parameters()).dtype for name in CMA_PROJECTORS}
    with torch.no_grad():  # the teacher side and all index embeddings are constants
        h_t = at_least_fp32(teacher_hidden_BTE[:, :-1])
        student_index = torch.cat([student_embed(student_x), student_embed(student_y)], -1)
        teacher_y_emb = at_least_fp32(teacher_embed(teacher_y))
        teacher_index = torch.cat([at_least_fp32(teacher_embed(teacher_x)), teacher_y_emb], -1)
        keys = teacher_index / _masked_std(teacher_index, teacher_mask)
        teacher_value_in = h_t / _masked_std(h_t, teacher_mask) + teacher_y_emb / _masked_std(
            teacher_y_emb, teacher_mask
        )
        # Padding must not reach the maths at all (not even as 0 * NaN): zero every masked row.
        keys = torch.where(teacher_mask[..., None], keys, 0.0)
        teacher_value_in = torch.where(teacher_mask[..., None], teacher_value_in, 0.0).to(dtype_of["t2s"])
        student_index = torch.where(student_mask[..., None], student_index, 0.0).to(dtype_of["query"])
    # Attention maths in at least fp32; each projector runs in its own (engine-chosen) dtype.
    queries = at_least_fp32(projectors["query"](student_index))
    scores = queries @ keys.to(queries.dtype).transpose(1, 2) / math.sqrt(keys.shape[-1])
    pair_mask = student_mask[:, :, None] & teacher_mask[:, None, :]
    scores = scores.masked_fill(~pair_mask, torch.finfo(scores.dtype).min)
    # A row with a valid key gives masked keys exp(min - max) = 0 exactly; a row without one becomes all zero.
    t2s_weights = torch.softmax(scores, dim=2) * pair_mask
    s2t_weights = torch.softmax(scores, dim=1) * pair_mask
    teacher_values = torch.where(teacher_mask[..., None], at_least_fp32(projectors["t2s"](teacher_value_in)), 0.0)
    student_in = torch.where(student_mask[..., None], h_s, 0.0).to(dtype_of["s2t"])
    student_values = torch.where(student_mask[..., None], at_least_fp32(projectors["s2t"](student_in)), 0.0)
    t2s_hidden = t2s_weights.to(teacher_values.dtype) @ teacher_values  # [B, S, D]
    s2t_hidden = s2t_weights.transpose(1, 2).to(student_values.dtype) @ student_values  # [B, T, E]
    return {
        "student_hidden_ND": h_s[student_mask],
        "t2s_hidden_ND": t2s_hidden[student_mask].to(h_s.dtype),
        "labels_N": student_y[student_mask],
        "s2t_hidden_ME": s2t_hidden[teacher_mask].to(teacher_hidden_BTE.dtype),
        "teacher_hidden_ME": teacher_hidden_BTE[:, :-1][teacher_mask].detach(),
        "t2s_weights_BST": t2s_weights,
    }


def _t2s_ce_chunk(t2s_hidden_CD: Tensor, labels_C: Tensor, *, student_head_frozen: HeadFn) -> tuple[Tensor, ...]:
    logits = student_head_frozen(t2s_hidden_CD)
    ce = F.cross_entropy(at_least_fp32(logits), labels_C, reduction="sum")
    return ce, logits.argmax(-1), logits.detach()


def _student_kd_chunk(
    student_hidden_CD: Tensor,
    t2s_hidden_CD: Tensor,
    mask_C: Tensor,
    *,
    target_logits_CV: Tensor | None,
    student_head: HeadFn,
    student_head_frozen: HeadFn,
    row_divergence: RowDivergence,
    params: DivergenceParams,
) -> tuple[Tensor]:
    logits = student_head(student_hidden_CD)
    if target_logits_CV is None:  # backward recomputation: rebuild the detached target
        with torch.no_grad():
            target_logits_CV = student_head_frozen(t2s_hidden_CD)
    return (torch.where(mask_C, row_divergence(logits, target_logits_CV, params), 0.0).sum(),)


def _s2t_chunk(
    s2t_hidden_CE: Tensor,
    teacher_hidden_CE: Tensor,
    *,
    teacher_head: HeadFn,
    row_divergence: RowDivergence,
    params: DivergenceParams,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        target = teacher_head(teacher_hidden_CE)
    logits = teacher_head(s2t_hidden_CE)
    return row_divergence(logits, target, params).sum(), (logits.argmax(-1) == target.argmax(-1)).sum()


def cma_loss(
    student_hidden_BSD: Tensor,
    teacher_hidden_BTE: Tensor,
    *,
    student_input_ids_BS: Tensor,
    student_labels_BS: Tensor,
    teacher_input_ids_BT: Tensor,
    teacher_labels_BT: Tensor,
    student_embed: EmbedFn,
    teacher_embed: EmbedFn,
    projectors: nn.ModuleDict,
    student_head: HeadFn,
    student_head_frozen: HeadFn,
    teacher_head: HeadFn,
    divergence: str = "forward_kl",
    params: DivergenceParams | None = None,
    chunk_size: int,
    ignore_index: int = -100,
) -> dict[str, tuple[Tensor, Tensor]]:
    """DSKD-CMA terms ``{name: (sum, count)}`` for one micro-batch.

    Args:
        student_hidden_BSD, teacher_hidden_BTE: last hidden states over the whole padded batch (the student's
            with grad; the teacher's is detached here).
        student_input_ids_BS, student_labels_BS, teacher_input_ids_BT, teacher_labels_BT: Contract 2 tensors
            (labels not shifted, -100 on prompt and padding).
        student_embed, teacher_embed: input-embedding lookups ``ids [B, L] -> [B, L, F|G]`` (e.g.
            ``model.get_input_embeddings()``); called under ``no_grad``.
        projectors: ``build_cma_projectors(...)`` (keys ``query``, ``t2s``, ``s2t``).
        student_head: trainable ``[C, D] -> [C, V]``; student_head_frozen: the same head without weight gradient
            (gradient still reaches its input); teacher_head: frozen ``[C, E] -> [C, W]``.
        divergence, params: used in both spaces; chunk_size: rows per chunk of every vocabulary-sized term.

    Returns:
        ``kd_t2s``, ``ce_t2s`` (count N), ``kd_s2t`` (count M) and metrics ``t2s_acc`` (N), ``s2t_acc`` (M).
    """
    missing = [name for name in CMA_PROJECTORS if name not in projectors]
    if missing:
        raise ValueError(f"projectors lacks {missing}; build them with build_cma_projectors")
    rows = cma_attention(
        student_hidden_BSD,
        teacher_hidden_BTE,
        student_input_ids_BS=student_input_ids_BS,
        student_labels_BS=student_labels_BS,
        teacher_input_ids_BT=teacher_input_ids_BT,
        teacher_labels_BT=teacher_labels_BT,
        student_embed=student_embed,
        teacher_embed=teacher_embed,
        projectors=projectors,
        ignore_index=ignore_index,
    )
    params = params or DivergenceParams()
    row_divergence = resolve_divergence(divergence)
    graph_zero = student_hidden_BSD.sum().float() * 0.0  # keeps every term attached even with no rows
    sums = {name: graph_zero for name in ("kd_t2s", "ce_t2s", "kd_s2t")}
    hits = {"t2s_acc": graph_zero.detach().long(), "s2t_acc": graph_zero.detach().long()}

    ce_fn = partial(_t2s_ce_chunk, student_head_frozen=student_head_frozen)
    student_fn = partial(
        _student_kd_chunk,
        student_head=student_head,
        student_head_frozen=student_head_frozen,
        row_divergence=row_divergence,
        params=params,
    )
    for student_h, t2s_h, labels in split_rows(
        [rows["student_hidden_ND"], rows["t2s_hidden_ND"], rows["labels_N"]], chunk_size
    ):
        ce_t2s, t2s_pred, target_logits = eager_input_grad(ce_fn, t2s_h, labels)
        correct = t2s_pred == labels
        (kd_t2s,) = recomputed_chunk(
            partial(student_fn, target_logits_CV=None),
            student_h,
            t2s_h.detach(),
            correct,
            first_pass_fn=partial(student_fn, target_logits_CV=target_logits),
        )
        del target_logits
        sums["ce_t2s"] = sums["ce_t2s"] + ce_t2s
        sums["kd_t2s"] = sums["kd_t2s"] + kd_t2s
        hits["t2s_acc"] = hits["t2s_acc"] + correct.sum()
    s2t_fn = partial(_s2t_chunk, teacher_head=teacher_head, row_divergence=row_divergence, params=params)
    for s2t_h, teacher_h in split_rows([rows["s2t_hidden_ME"], rows["teacher_hidden_ME"]], chunk_size):
        kd_s2t, s2t_hits = eager_input_grad(s2t_fn, s2t_h, teacher_h)
        sums["kd_s2t"] = sums["kd_s2t"] + kd_s2t
        hits["s2t_acc"] = hits["s2t_acc"] + s2t_hits
    device = student_hidden_BSD.device
    count_n = torch.tensor(rows["labels_N"].shape[0], dtype=torch.long, device=device)
    count_m = torch.tensor(rows["teacher_hidden_ME"].shape[0], dtype=torch.long, device=device)
    return {
        "kd_t2s": (sums["kd_t2s"], count_n),
        "ce_t2s": (sums["ce_t2s"], count_n),
        "kd_s2t": (sums["kd_s2t"], count_m),
        "t2s_acc": (hits["t2s_acc"], count_n),
        "s2t_acc": (hits["s2t_acc"], count_m),
    }
