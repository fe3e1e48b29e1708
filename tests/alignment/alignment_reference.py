"""Independent reference for the alignment tests: spans from the tokenizer's own decoder, brute-force optimum.

Deliberately shares no code with ``dskd_scale.alignment``: it never looks at offsets or byte tables.
"""

from __future__ import annotations


def reference_spans(tokenizer, ids: list[int], text: str, drop_leading: int = 0) -> list[tuple[int, int, bool] | None]:
    """Spans computed independently of the library, by the tokenizer's own Rust decoder.

    Decode growing prefixes of the content ids: where a decoded prefix is a clean prefix of the full decode,
    the last token ends there. Tokens between two clean ends form one group sharing its span; a group of one
    token with a non-empty span is "whole" (alignable). The decoder may strip one dummy leading space; the
    difference to the text is added back. ``drop_leading`` characters (a decoder that keeps a dummy prefix
    space, passed ``" " + text``) are removed from the positions. Special tokens give None. Quadratic.
    """
    backend = tokenizer.backend_tokenizer
    special = set(tokenizer.all_special_ids)
    content = [token_id for token_id in ids if token_id not in special]
    full = backend.decode(content, skip_special_tokens=True)
    shift = len(text) - len(full)
    assert shift >= 0 and text.endswith(full) and text[:shift].strip(" ") == "", (text, full)
    spans: list[tuple[int, int, bool] | None] = [None] * len(ids)
    group: list[int] = []
    group_start = 0
    prefix: list[int] = []
    for position, token_id in enumerate(ids):
        if token_id in special:
            continue
        prefix.append(token_id)
        group.append(position)
        decoded = backend.decode(prefix, skip_special_tokens=True)
        if not full.startswith(decoded) or decoded.endswith("\ufffd"):
            continue  # the prefix ends inside a character: the group goes on
        end = len(decoded) + shift
        end = max(end - drop_leading, 0)
        for member in group:
            spans[member] = (group_start, end, len(group) == 1 and end > group_start)
        group, group_start = [], end
    assert not group, f"tokens {group} never reached a character boundary in {text!r}"
    return spans


def brute_force_pairs(reference_a, reference_b) -> set[tuple[int, int]]:
    """Every (i, j) of whole tokens with identical reference spans: the exact-span optimum, exhaustively."""
    whole_b: dict[tuple[int, int], list[int]] = {}
    for j, span_b in enumerate(reference_b):
        if span_b and span_b[2]:
            whole_b.setdefault(span_b[:2], []).append(j)
    return {(i, j) for i, span_a in enumerate(reference_a) if span_a and span_a[2] for j in whole_b.get(span_a[:2], [])}
