"""Distillation losses: divergences, chunked head drivers, student CE, DSKD v2 terms, global reduction.

Pure tensor functions returning ``(sum, count)``; this package imports neither transformers nor deepspeed.

Engine recipe, per optimizer step (names from this package and ``dskd_scale.projectors``)::

    s2t_map.rebuild(student_head_weight)               # inside a ZeRO-3 gather, once per optimizer step
    mask = use_t2s_agreement_mask(prev_agreeing, prev_rows, threshold)   # from the last step's metrics
    counts = data_counts(label_tokens, aligned_rows)   # summed over the GA window, then all-reduced (SUM)
    for each micro-batch:
        h_s = student_hidden_BSD[align_batch, align_student - 1]   # rows predicting the aligned tokens
        h_t = teacher_hidden_BTE[align_batch, align_teacher - 1]
        terms = dskd_loss(h_s, h_t, ..., options=replace(options, agreement_mask=mask))
        terms["ce"] = student_ce(h_labelled, labels, student_head, chunk_size=...)  # or student_labels_A=
        local = official_local_counts(terms, ...) if kd.normalization == "official" else None
        loss, metrics = combine_terms(terms, counts, alpha=..., world_size=dp, grad_accum_steps=ga,
                                      spaces=kd.spaces, local_counts=local)
        engine.backward(loss)
"""

from dskd_scale.losses.ce import student_ce
from dskd_scale.losses.chunked import (
    HeadFn,
    TrainableHead,
    chunked_head_loss,
    eager_input_grad,
    fused_head_chunk,
    recomputed_chunk,
    split_rows,
)
from dskd_scale.losses.divergences import DIVERGENCES, DivergenceParams, divergence, resolve_divergence
from dskd_scale.losses.dskd import LOSS_TERMS, DSKDOptions, dskd_loss, map_teacher_ids
from dskd_scale.losses.reduce import (
    KD_TERMS_BY_SPACE,
    NORMALIZATIONS,
    combine_terms,
    data_counts,
    official_local_counts,
    term_weights,
    use_t2s_agreement_mask,
)

__all__ = [
    "DIVERGENCES",
    "KD_TERMS_BY_SPACE",
    "LOSS_TERMS",
    "NORMALIZATIONS",
    "DSKDOptions",
    "DivergenceParams",
    "HeadFn",
    "TrainableHead",
    "chunked_head_loss",
    "combine_terms",
    "data_counts",
    "divergence",
    "dskd_loss",
    "eager_input_grad",
    "fused_head_chunk",
    "map_teacher_ids",
    "official_local_counts",
    "recomputed_chunk",
    "resolve_divergence",
    "split_rows",
    "student_ce",
    "term_weights",
    "use_t2s_agreement_mask",
]
