"""Token spans: which characters of the text each token stands for, the same way on every tokenizer.

Raw ``offset_mapping`` values do not describe text the same way across tokenizer families: a byte-level
BPE post-processor may trim a token's leading space out of its offsets, a SentencePiece ``Prepend``
normaliser maps the inserted dummy '▁' onto the first character (so two tokens claim it), and pieces of
one multi-byte character all report that character. The span of a token is therefore derived from its
raw bytes (``token_bytes``) laid end to end over the UTF-8 text, which is exact whenever the tokenizer did
not rewrite the text:

* fast path, per text piece between special tokens: the concatenated token bytes equal the piece's bytes
  (allowing one inserted dummy-prefix space), and byte offsets come from a cumulative sum;
* fallback, for a piece the normaliser rewrote (NFC/NFKC, lower-casing, ...): a token keeps its tokenizer
  offsets only if its bytes equal the text they cover; every other token of that piece is unalignable.

Every token gets a **byte span** (offsets into the UTF-8 text) and the smallest character span containing it.
A token is **alignable** when it covers bytes that no other token of its tokenisation covers; a token standing
for part of a multi-byte character (byte-level BPE, '<0xNN>' byte fallback) is alignable too, since two
tokenisations can split an emoji or a CJK character at the same bytes. Special tokens (BOS, EOS, chat markers)
get their offsets as span (empty for those added by the post-processor) and are never alignable. All work is
vectorised numpy over the tokens of one text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dskd_scale.alignment.token_bytes import TokenTable, token_table


@dataclass(frozen=True, eq=False)
class TokenSpans:
    """One text tokenised by one tokenizer, with normalised character spans.

    - ``ids`` int64 [n]: token ids as the tokenizer produced them (special tokens included).
    - ``starts``, ``ends`` int64 [n]: character offsets into the text; ``text[starts[i]:ends[i]]`` is the text
      token ``i`` stands for (empty for special tokens added by the post-processor and for a dummy prefix).
    - ``byte_starts``, ``byte_ends`` int64 [n]: the same spans in bytes of ``text.encode("utf-8")``; a piece of a
      multi-byte character has a byte span inside the character span it shares with the other pieces.
    - ``word_starts`` int64 [n]: ``byte_starts`` moved past the token's leading spaces (the 'Ġ'/'▁' word-boundary
      marker); equal to ``byte_starts`` for a token made of spaces only. Used by ``whitespace="paper"``.
    - ``alignable`` bool [n]: the token covers (non-empty) bytes that no other token covers.
    - ``text_length``: ``len(text)`` in characters, to refuse aligning spans of different texts.
    - ``num_bytes``: ``len(text.encode("utf-8"))``.
    - ``fingerprint``: the tokenizer's byte-table fingerprint (identical tokenizers share it).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    alignable: np.ndarray
    text_length: int
    fingerprint: str
    byte_starts: np.ndarray
    byte_ends: np.ndarray
    word_starts: np.ndarray
    num_bytes: int

    def __len__(self) -> int:
        return int(self.ids.shape[0])


class _TextIndex:
    """Character <-> UTF-8 byte offset conversion for one text (identity for ASCII text)."""

    def __init__(self, text: str, text_bytes: bytes) -> None:
        self.num_chars = len(text)
        self.ascii = len(text_bytes) == self.num_chars
        if self.ascii:
            return
        code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_lengths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
        self.char_to_byte = np.zeros(self.num_chars + 1, dtype=np.int64)
        np.cumsum(char_lengths, out=self.char_to_byte[1:])
        # byte -> index of the character containing it; one extra entry so that the end offset maps too
        self.byte_to_char = np.append(
            np.repeat(np.arange(self.num_chars, dtype=np.int64), char_lengths), self.num_chars
        )
        self.is_boundary = np.zeros(len(text_bytes) + 1, dtype=bool)
        self.is_boundary[self.char_to_byte] = True

    def to_bytes(self, chars: np.ndarray) -> np.ndarray:
        return chars if self.ascii else self.char_to_byte[chars]

    def to_chars(self, byte_starts: np.ndarray, byte_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smallest character span covering each byte span."""
        if self.ascii:
            return byte_starts, byte_ends
        return self.byte_to_char[byte_starts], self.byte_to_char[byte_ends] + ~self.is_boundary[byte_ends]


# Rows of the int64 [5, n] span matrix a piece is computed into (one fancy assignment moves all of them).
_STARTS, _ENDS, _BYTE_STARTS, _BYTE_ENDS, _WORD_STARTS = range(5)


def _word_starts(byte_starts: np.ndarray, lengths: np.ndarray, leading_spaces: np.ndarray) -> np.ndarray:
    """Byte starts after the leading spaces; a token of spaces only keeps its start (it is its own word)."""
    return byte_starts + np.where(leading_spaces < lengths, leading_spaces, 0)


def _piece_spans_from_bytes(
    table: TokenTable, ids: np.ndarray, piece_bytes: bytes, byte_offset: int, index: _TextIndex
) -> tuple[np.ndarray, np.ndarray] | None:
    """(span matrix int64 [5, n], alignable bool [n]) of the content tokens ``ids`` that tile ``piece_bytes``, or
    None when their bytes do not match."""
    lengths = table.byte_lengths[ids]  # fancy indexing: already a copy
    leading_spaces = table.leading_spaces[ids]
    joined = b"".join(table.bytes_array[ids].tolist())
    if joined != piece_bytes:
        # SentencePiece inserts one dummy '▁' before the first token of a piece; it stands for no text
        if not (len(joined) == len(piece_bytes) + 1 and joined[:1] == b" " and joined[1:] == piece_bytes):
            return None
        first = int(np.argmax(lengths > 0))
        lengths[first] -= 1
        leading_spaces[first] -= 1
    spans = np.empty((5, ids.size), dtype=np.int64)
    byte_ends = np.cumsum(lengths, out=spans[_BYTE_ENDS])
    byte_ends += byte_offset
    byte_starts = np.subtract(byte_ends, lengths, out=spans[_BYTE_STARTS])
    spans[_STARTS], spans[_ENDS] = index.to_chars(byte_starts, byte_ends)
    spans[_WORD_STARTS] = _word_starts(byte_starts, lengths, leading_spaces)
    return spans, lengths > 0


def _piece_spans_verified(
    table: TokenTable, ids: np.ndarray, offsets: np.ndarray, text_bytes: bytes, index: _TextIndex
) -> tuple[np.ndarray, np.ndarray]:
    """Fallback: tokenizer offsets, kept alignable only where the token's bytes equal the text they cover."""
    starts, ends = offsets[:, 0].copy(), offsets[:, 1].copy()
    byte_starts, byte_ends = index.to_bytes(starts), index.to_bytes(ends)
    lengths = table.byte_lengths[ids]
    candidate = (byte_ends - byte_starts == lengths) & (lengths > 0)
    verified = np.zeros(len(ids), dtype=bool)
    if candidate.any():
        cand_lengths = lengths[candidate]
        token_stream = np.frombuffer(b"".join(table.bytes_array[ids[candidate]].tolist()), dtype=np.uint8)
        text_stream = np.frombuffer(text_bytes, dtype=np.uint8)
        token_starts = np.cumsum(cand_lengths) - cand_lengths
        within = np.arange(token_stream.size) - np.repeat(token_starts, cand_lengths)
        text_positions = np.repeat(byte_starts[candidate], cand_lengths) + within
        mismatch = (token_stream != text_stream[text_positions]).astype(np.int64)
        verified[candidate] = np.add.reduceat(mismatch, token_starts) == 0
    word_starts = _word_starts(byte_starts, np.where(verified, lengths, 0), table.leading_spaces[ids])
    return np.stack([starts, ends, byte_starts, byte_ends, word_starts]), verified


OffsetsAt = Callable[[np.ndarray], np.ndarray]  # token positions int [k] -> their char offsets int64 [k, 2]


def _offsets_from_sequence(offsets: Sequence) -> OffsetsAt:
    materialised: list[np.ndarray] = []

    def offsets_at(positions: np.ndarray) -> np.ndarray:
        if not materialised:
            materialised.append(np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
        return materialised[0][positions]

    return offsets_at


def _offsets_from_encoding(encoding: Any) -> OffsetsAt:
    """Reading ``Encoding.offsets`` builds a Python tuple per token; a few positions are read one by one."""

    def offsets_at(positions: np.ndarray) -> np.ndarray:
        if positions.size > 16:
            return np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)[positions]
        chars = [encoding.token_to_chars(position) for position in positions.tolist()]
        return np.asarray([(0, 0) if span is None else span for span in chars], dtype=np.int64).reshape(-1, 2)

    return offsets_at


def spans_from_encoding(
    tokenizer: Any, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], *, name: str = "tokenizer"
) -> TokenSpans:
    """Normalised spans for an existing encoding of ``text``: ``ids`` int [n], ``offsets`` int [n, 2] (chars)."""
    if len(offsets) != len(ids):
        raise ValueError(f"{name}: {len(ids)} ids but {len(offsets)} offsets")
    return _spans(token_table(tokenizer, name), text, ids, _offsets_from_sequence(offsets), name)


def spans_from_ids(tokenizer: Any, text: str, ids: Sequence[int], *, name: str = "tokenizer") -> TokenSpans:
    """Normalised spans of ids that spell ``text`` without an encoding (sampled ids, a stored prompt).

    Special tokens get an empty span at the text start (they stand for no text). Where the ids' bytes do not tile
    the text (a normaliser rewrote it, or the ids spell another text) no offsets exist to fall back on, and the
    tokens of that piece are unalignable.
    """
    return _spans(token_table(tokenizer, name), text, ids, _no_offsets, name)


def _no_offsets(positions: np.ndarray) -> np.ndarray:
    return np.zeros((positions.size, 2), dtype=np.int64)


def _spans(table: TokenTable, text: str, ids: Sequence[int], offsets_at: OffsetsAt, name: str) -> TokenSpans:
    """Core of ``spans_from_encoding``; offsets are read only for special tokens and fallback pieces."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= table.vocab_size):
        raise ValueError(f"{name}: token ids outside [0, {table.vocab_size}) for text {text[:60]!r}")
    text_bytes = text.encode("utf-8")
    index = _TextIndex(text, text_bytes)
    is_special = table.byte_lengths[ids] < 0
    if not is_special.any():  # the common case: one piece, no special token, no offsets needed
        piece = _piece_spans_from_bytes(table, ids, text_bytes, 0, index)
        if piece is not None:
            return _token_spans(ids, *piece, index, len(text_bytes), table.fingerprint)
    spans = np.zeros((5, ids.shape[0]), dtype=np.int64)
    alignable = np.zeros(ids.shape[0], dtype=bool)
    special_positions = np.flatnonzero(is_special)
    if special_positions.size:  # specials keep their offsets: empty when added, the literal when spelled out
        special_offsets = offsets_at(special_positions).T
        byte_offsets = index.to_bytes(special_offsets)
        spans[:, special_positions] = np.concatenate([special_offsets, byte_offsets, byte_offsets[:1]])
    starts, ends = spans[_STARTS], spans[_ENDS]
    consuming_special = is_special & (ends > starts)  # a special token spelled out in the text splits it
    content = np.flatnonzero(~is_special)
    used_fallback = False
    for members, byte_start, byte_end in _pieces(content, consuming_special, starts, ends, index, len(text_bytes)):
        piece = _piece_spans_from_bytes(table, ids[members], text_bytes[byte_start:byte_end], byte_start, index)
        if piece is None:
            piece = _piece_spans_verified(table, ids[members], offsets_at(members), text_bytes, index)
            used_fallback = True
        spans[:, members], alignable[members] = piece
    if used_fallback:  # byte-tiled pieces never overlap; verified offsets may (a dummy '▁' claiming character 0)
        alignable &= _covers_alone(spans[_BYTE_STARTS], spans[_BYTE_ENDS])
    return _token_spans(ids, spans, alignable, index, len(text_bytes), table.fingerprint)


def _token_spans(ids: np.ndarray, spans: np.ndarray, alignable: np.ndarray, index: _TextIndex, num_bytes: int,
                 fingerprint: str) -> TokenSpans:
    return TokenSpans(
        ids=ids,
        starts=spans[_STARTS],
        ends=spans[_ENDS],
        alignable=alignable,
        text_length=index.num_chars,
        fingerprint=fingerprint,
        byte_starts=spans[_BYTE_STARTS],
        byte_ends=spans[_BYTE_ENDS],
        word_starts=spans[_WORD_STARTS],
        num_bytes=num_bytes,
    )


def _pieces(
    content: np.ndarray,
    consuming_special: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    index: _TextIndex,
    num_bytes: int,
) -> list[tuple[np.ndarray, int, int]]:
    """(content token positions, byte start, byte end) of each text piece between specials spelled in the text."""
    if not consuming_special.any():
        return [(content, 0, num_bytes)] if content.size else []
    splitting = np.flatnonzero(consuming_special)
    char_starts = np.concatenate([[0], ends[splitting]])
    char_ends = np.concatenate([starts[splitting], [index.num_chars]])
    byte_starts, byte_ends = index.to_bytes(char_starts).tolist(), index.to_bytes(char_ends).tolist()
    piece_of_content = np.cumsum(consuming_special)[content]
    bounds = np.searchsorted(piece_of_content, np.arange(char_starts.size + 1)).tolist()
    return [
        (content[bounds[piece] : bounds[piece + 1]], byte_starts[piece], byte_ends[piece])
        for piece in range(char_starts.size)  # one entry per piece, not per token
        if bounds[piece + 1] > bounds[piece]
    ]


def _covers_alone(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """bool [n]: the token's non-empty span overlaps no other token's span (tokens are in text order)."""
    nonempty = ends > starts
    big = np.iinfo(np.int64).max
    end_or_min = np.where(nonempty, ends, -1)
    start_or_max = np.where(nonempty, starts, big)
    max_end_before = np.concatenate([[-1], np.maximum.accumulate(end_or_min)[:-1]])
    min_start_after = np.concatenate([np.minimum.accumulate(start_or_max[::-1])[::-1][1:], [big]])
    return nonempty & (starts >= max_end_before) & (ends <= min_start_after)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], OffsetsAt]]:
    """(ids, offsets getter) per text; reading offsets costs a Python tuple per token, so it is deferred."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        # the Rust call a fast tokenizer's __call__ makes, without the Python-side tensor conversion
        if len(texts) == 1:
            encodings = [backend.encode(texts[0], add_special_tokens=add_special_tokens)]
        else:
            encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(enc.ids, _offsets_from_encoding(enc)) for enc in encodings]
    # truncation/padding left enabled on the backend by an earlier call: go through __call__, which resets it
    batch = tokenizer(
        texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False, padding=False
    )
    return [
        (ids, _offsets_from_sequence(offsets))
        for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"], strict=True)
    ]


def encode_with_spans(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> TokenSpans:
    """Tokenise ``text`` with a fast tokenizer; return ids with normalised character spans.

    ``ids`` equal ``tokenizer(text, add_special_tokens=...)["input_ids"]``. Raises ValueError for a slow
    tokenizer (no offsets) or an unsupported vocabulary convention.
    """
    table = token_table(tokenizer)  # refuses slow tokenizers with a clear error before encoding
    ((ids, get_offsets),) = _encode(tokenizer, [text], add_special_tokens)
    return _spans(table, text, ids, get_offsets, "tokenizer")


def encode_batch_with_spans(tokenizer: Any, texts: list[str], *, add_special_tokens: bool = True) -> list[TokenSpans]:
    """``encode_with_spans`` over many texts with one backend batch call."""
    table = token_table(tokenizer)
    encoded = _encode(tokenizer, list(texts), add_special_tokens)
    return [
        _spans(table, text, ids, get_offsets, "tokenizer")
        for text, (ids, get_offsets) in zip(texts, encoded, strict=True)
    ]
