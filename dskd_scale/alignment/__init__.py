"""Exact Token Alignment: token spans from offsets, span-exact alignment, byte-level vocabulary map.

Imports numpy only (tokenizer objects are passed in); never transformers, torch models or deepspeed.
"""

from dskd_scale.alignment.eta import exact_token_alignment
from dskd_scale.alignment.spans import TokenSpans, encode_batch_with_spans, encode_with_spans, spans_from_encoding
from dskd_scale.alignment.token_bytes import TokenTable, require_fast_tokenizer, token_bytes, token_table
from dskd_scale.alignment.vocab_map import VocabMap, build_vocab_map

__all__ = [
    "TokenSpans",
    "TokenTable",
    "VocabMap",
    "build_vocab_map",
    "encode_batch_with_spans",
    "encode_with_spans",
    "exact_token_alignment",
    "require_fast_tokenizer",
    "spans_from_encoding",
    "token_bytes",
    "token_table",
]
