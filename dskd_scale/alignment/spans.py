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

A token is **alignable** when it stands for whole characters that no other token also covers. Special
tokens (BOS, EOS, chat markers) get their offsets as span (empty for those added by the post-processor)
and are never alignable. All work is vectorised numpy over the tokens of one text.
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
    - ``alignable`` bool [n]: the token covers whole characters that no other token covers.
    - ``text_length``: ``len(text)`` in characters, to refuse aligning spans of different texts.
    - ``fingerprint``: the tokenizer's byte-table fingerprint (identical tokenizers share it).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    alignable: np.ndarray
    text_length: int
    fingerprint: str

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

    def to_chars(self, byte_starts: np.ndarray, byte_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Smallest character span covering each byte span, and whether it falls on character boundaries."""
        if self.ascii:
            return byte_starts, byte_ends, np.ones(byte_starts.shape, dtype=bool)
        starts = self.byte_to_char[byte_starts]
        ends = self.byte_to_char[byte_ends]
        end_inside_char = ~self.is_boundary[byte_ends]
        ends = ends + end_inside_char
        whole = self.is_boundary[byte_starts] & ~end_inside_char
        return starts, ends, whole


def _piece_spans_from_bytes(
    table: TokenTable, ids: np.ndarray, piece_bytes: bytes, byte_offset: int, index: _TextIndex
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Spans of the content tokens ``ids`` that tile ``piece_bytes``, or None when their bytes do not match."""
    lengths = table.byte_lengths[ids]  # fancy indexing: already a copy
    joined = b"".join(table.bytes_array[ids].tolist())
    if joined != piece_bytes:
        # SentencePiece inserts one dummy '▁' before the first token of a piece; it stands for no text
        if not (len(joined) == len(piece_bytes) + 1 and joined[:1] == b" " and joined[1:] == piece_bytes):
            return None
        lengths[int(np.argmax(lengths > 0))] -= 1
    byte_ends = np.cumsum(lengths)
    byte_ends += byte_offset
    byte_starts = byte_ends - lengths
    starts, ends, whole = index.to_chars(byte_starts, byte_ends)
    return starts, ends, whole & (lengths > 0)


def _piece_spans_verified(
    table: TokenTable, ids: np.ndarray, offsets: np.ndarray, text_bytes: bytes, index: _TextIndex
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    return starts, ends, verified


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


def _spans(table: TokenTable, text: str, ids: Sequence[int], offsets_at: OffsetsAt, name: str) -> TokenSpans:
    """Core of ``spans_from_encoding``; offsets are read only for special tokens and fallback pieces."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= table.vocab_size):
        raise ValueError(f"{name}: token ids outside [0, {table.vocab_size}) for text {text[:60]!r}")
    text_bytes = text.encode("utf-8")
    index = _TextIndex(text, text_bytes)
    is_special = table.byte_lengths[ids] < 0
    if not is_special.any():  # the common case: one piece, no special token, no offsets needed
        spans = _piece_spans_from_bytes(table, ids, text_bytes, 0, index)
        if spans is not None:
            starts, ends, alignable = spans
            return TokenSpans(ids, starts, ends, alignable, index.num_chars, table.fingerprint)
    starts = np.zeros(ids.shape[0], dtype=np.int64)
    ends = np.zeros(ids.shape[0], dtype=np.int64)
    whole = np.zeros(ids.shape[0], dtype=bool)
    special_positions = np.flatnonzero(is_special)
    if special_positions.size:  # specials keep their offsets: empty when added, the literal when spelled out
        special_offsets = offsets_at(special_positions)
        starts[special_positions], ends[special_positions] = special_offsets[:, 0], special_offsets[:, 1]
    consuming_special = is_special & (ends > starts)  # a special token spelled out in the text splits it
    content = np.flatnonzero(~is_special)
    used_fallback = False
    for members, byte_start, byte_end in _pieces(content, consuming_special, starts, ends, index, len(text_bytes)):
        spans = _piece_spans_from_bytes(table, ids[members], text_bytes[byte_start:byte_end], byte_start, index)
        if spans is None:
            spans = _piece_spans_verified(table, ids[members], offsets_at(members), text_bytes, index)
            used_fallback = True
        starts[members], ends[members], whole[members] = spans

    # byte-tiled pieces never overlap; verified tokenizer offsets may (a dummy '▁' claiming character 0)
    alignable = whole & _covers_alone(starts, ends) if used_fallback else whole
    return TokenSpans(
        ids=ids,
        starts=starts,
        ends=ends,
        alignable=alignable,
        text_length=index.num_chars,
        fingerprint=table.fingerprint,
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
