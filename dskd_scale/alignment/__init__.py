"""Exact Token Alignment: token byte spans, span-exact alignment (offline rows and online rollouts through one batch
code path, ``batch``), byte-level vocabulary map.

Imports numpy only (tokenizer objects are passed in); never transformers, torch models or deepspeed.
"""

from dskd_scale.alignment.eta import WHITESPACE_MODES, exact_token_alignment, span_keys
from dskd_scale.alignment.online import RolloutRow, align_rollouts, prompt_text
from dskd_scale.alignment.spans import (
    TokenSpans,
    encode_batch_with_spans,
    encode_with_spans,
    spans_from_encoding,
    spans_from_ids,
)
from dskd_scale.alignment.token_bytes import TokenTable, require_fast_tokenizer, token_bytes, token_table
from dskd_scale.alignment.vocab_map import VocabMap, build_vocab_map

__all__ = [
    "RolloutRow",
    "WHITESPACE_MODES",
    "TokenSpans",
    "TokenTable",
    "VocabMap",
    "align_rollouts",
    "build_vocab_map",
    "encode_batch_with_spans",
    "encode_with_spans",
    "exact_token_alignment",
    "prompt_text",
    "require_fast_tokenizer",
    "span_keys",
    "spans_from_encoding",
    "spans_from_ids",
    "token_bytes",
    "token_table",
]
