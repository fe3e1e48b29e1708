"""Baseline distillation criteria: SFT, vanilla KD, DSKD v1 with cross-model attention, ULD and MinED.

Same interface as DSKD: pure tensor functions returning ``{name: (sum, count)}``; flat rows wherever the method
allows (CMA attends over whole sequences, so it takes padded ``[B, L, ·]`` tensors); anything vocabulary-sized in
token chunks. ``dispatch`` wires them to a Contract 2 batch for the training loop.
"""

from dskd_scale.losses.baselines.cma import CMA_PROJECTORS, build_cma_projectors, cma_attention, cma_loss
from dskd_scale.losses.baselines.dispatch import BASELINES, KD_TERMS, BaselineResources, criterion_terms, local_counts
from dskd_scale.losses.baselines.mined import mined_kd_loss, mined_target_logits, mined_teacher_rows
from dskd_scale.losses.baselines.uld import sorted_probability_l1, uld_loss, uld_pairs
from dskd_scale.losses.baselines.vanilla import check_same_vocabulary, sft_loss, vanilla_kd_loss

__all__ = [
    "BASELINES",
    "CMA_PROJECTORS",
    "KD_TERMS",
    "BaselineResources",
    "build_cma_projectors",
    "check_same_vocabulary",
    "cma_attention",
    "cma_loss",
    "criterion_terms",
    "local_counts",
    "mined_kd_loss",
    "mined_target_logits",
    "mined_teacher_rows",
    "sft_loss",
    "sorted_probability_l1",
    "uld_loss",
    "uld_pairs",
    "vanilla_kd_loss",
]
