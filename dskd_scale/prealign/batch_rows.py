"""Row building for a chunk of examples at once: the same rows as ``RowBuilder.build``, with one batch
tokenisation per side and one alignment over all tokens of the chunk (``RowBuilder.assemble``, which runs
``dskd_scale.alignment.batch``) instead of a few dozen small numpy operations per row. Truncation (rare) still
runs per row, before that. ``tests/prealign/test_rows.py`` checks that the result equals ``build`` row by row.
"""

from __future__ import annotations

import numpy as np

from dskd_scale.alignment import encode_batch_with_spans
from dskd_scale.prealign.rows import RowBuilder, RowResult


def build_rows(builder: RowBuilder, examples: list[tuple[str, str]]) -> list[RowResult]:
    """``[builder.build(prompt, response) for ...]``, vectorised over the chunk (see the module docstring)."""
    if not examples:
        return []
    texts = [prompt + response for prompt, response in examples]
    teacher_spans = encode_batch_with_spans(builder.teacher_tokenizer, texts)
    student_spans = encode_batch_with_spans(builder.student_tokenizer, texts)
    prompts, responses = [], []
    prompt_truncated = np.zeros(len(examples), dtype=bool)
    response_truncated = np.zeros(len(examples), dtype=bool)
    for i, (prompt, response) in enumerate(examples):
        pair = (teacher_spans[i], student_spans[i])
        if not builder._both_fit(pair, with_eos=True):
            prompt, response, pair, prompt_truncated[i], response_truncated[i] = builder._truncate(
                prompt, response, pair)
            teacher_spans[i], student_spans[i] = pair
        prompts.append(prompt)
        responses.append(response)
    return builder.assemble(prompts, responses, teacher_spans, student_spans, prompt_truncated, response_truncated)
