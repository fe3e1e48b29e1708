"""Distillation losses: divergences, chunked head drivers, student CE, DSKD v2 terms, global reduction.

Pure tensor functions returning ``(sum, count)``; this package imports neither transformers nor deepspeed.

Engine recipe, per optimizer step (names from this package and ``dskd_scale.projectors``)::

    s2t_map.rebuild(student_head_weight)               # inside a ZeRO-3 gather, once per optimizer step
    mask = use_t2s_agreement_mask(prev_agreeing, prev_rows, threshold)   # from the last step's metrics
    counts = data_counts(label_tokens, aligned_rows)   # summed over the GA window, then all-reduced (SUM)
    for each micro-batch:
        h_s = predicting_rows(student_hidden_BSD, align_batch, align_student)
        h_t = predicting_rows(teacher_hidden_BTE, align_batch, align_teacher)
        terms = dskd_loss(h_s, h_t, ..., options=replace(options, agreement_mask=mask))
        terms["ce"] = student_ce(h_labelled, labels, student_head, chunk_size=...)  # or student_labels_A=
        loss, metrics = combine_terms(terms, counts, alpha=..., world_size=dp, grad_accum_steps=ga)
        engine.backward(loss)
"""

from dskd_scale.losses.ce import student_ce
from dskd_scale.losses.chunked import HeadFn, chunked_head_loss, eager_input_grad, recomputed_chunk, split_rows
from dskd_scale.losses.divergences import DIVERGENCES, DivergenceParams, divergence, resolve_divergence
from dskd_scale.losses.dskd import LOSS_TERMS, DSKDOptions, dskd_loss, map_teacher_ids, predicting_rows
from dskd_scale.losses.reduce import KD_TERMS_BY_SPACE, combine_terms, data_counts, use_t2s_agreement_mask

__all__ = [
    "DIVERGENCES",
    "KD_TERMS_BY_SPACE",
    "LOSS_TERMS",
    "DSKDOptions",
    "DivergenceParams",
    "HeadFn",
    "chunked_head_loss",
    "combine_terms",
    "data_counts",
    "divergence",
    "dskd_loss",
    "eager_input_grad",
    "map_teacher_ids",
    "predicting_rows",
    "recomputed_chunk",
    "resolve_divergence",
    "split_rows",
    "student_ce",
    "use_t2s_agreement_mask",
]
