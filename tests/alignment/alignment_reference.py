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
    """Every (i, j) of whole tokens with identical reference spans (characters or bytes): the optimum, exhaustively."""
    whole_b: dict[tuple[int, int], list[int]] = {}
    for j, span_b in enumerate(reference_b):
        if span_b and span_b[2]:
            whole_b.setdefault(span_b[:2], []).append(j)
    return {(i, j) for i, span_a in enumerate(reference_a) if span_a and span_a[2] for j in whole_b.get(span_a[:2], [])}


def _vocabulary_byte_length(tokenizer, token: str) -> int:
    """Bytes a vocabulary string stands for, from the string alone: a byte-level alphabet spells one byte per
    character, '<0xNN>' is one byte, SentencePiece's '▁' is one space byte."""
    if "ByteLevel" in type(tokenizer.backend_tokenizer.decoder).__name__ or "ByteLevel" in str(
        tokenizer.backend_tokenizer.decoder.__getstate__()
    ):
        return len(token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return 1
    return len(token.replace("\u2581", " ").encode("utf-8"))


def reference_byte_spans(tokenizer, ids: list[int], text: str, reference) -> list[tuple[int, int, bool] | None]:
    """Byte spans from the character reference: a token alone in its character group keeps the group's bytes; the
    tokens of a group covering one multi-byte character share its bytes in order, each as many bytes as its
    vocabulary string spells (one dummy prefix space at the text start is not text). Alignable = non-empty."""
    to_byte = [0]
    for char in text:
        to_byte.append(to_byte[-1] + len(char.encode("utf-8")))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    result: list[tuple[int, int, bool] | None] = [None] * len(ids)
    groups: dict[tuple[int, int], list[int]] = {}
    for position, span in enumerate(reference):
        if span is not None:
            groups.setdefault(span[:2], []).append(position)
    for (start, end), members in groups.items():
        byte_start, byte_end = to_byte[start], to_byte[end]
        if len(members) == 1:
            result[members[0]] = (byte_start, byte_end, reference[members[0]][2])
            continue
        lengths = [_vocabulary_byte_length(tokenizer, tokens[m]) for m in members]
        if sum(lengths) == byte_end - byte_start + 1 and start == 0 and tokens[members[0]].startswith(("\u2581", "Ġ")):
            lengths[0] -= 1  # the dummy prefix space
        if sum(lengths) != byte_end - byte_start:
            for m in members:
                result[m] = (byte_start, byte_end, False)
            continue
        for m, length in zip(members, lengths, strict=True):
            result[m] = (byte_start, byte_start + length, length > 0)
            byte_start += length
    return result


def strip_leading_spaces(byte_spans, text: str):
    """The paper's whitespace-insensitive spans: each span without its leading spaces (a span of spaces only
    stays as it is)."""
    data = text.encode("utf-8")
    stripped = []
    for span in byte_spans:
        if span is None:
            stripped.append(None)
            continue
        start, end, whole = span
        inner = start
        while inner < end and data[inner] == 0x20:
            inner += 1
        stripped.append((inner if inner < end else start, end, whole))
    return stripped
