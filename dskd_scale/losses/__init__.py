"""Distillation losses: divergences, chunked head drivers, student CE, DSKD v2 terms, global reduction.

Pure tensor functions returning ``(sum, count)``; this package imports neither transformers nor deepspeed.
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
