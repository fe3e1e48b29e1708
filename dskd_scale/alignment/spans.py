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
    lengths = table.byte_lengths[ids].copy()
    joined = b"".join(table.bytes_array[ids].tolist())
    if joined != piece_bytes:
        # SentencePiece inserts one dummy '▁' before the first token of a piece; it stands for no text
        if not (len(joined) == len(piece_bytes) + 1 and joined[:1] == b" " and joined[1:] == piece_bytes):
            return None
        lengths[int(np.argmax(lengths > 0))] -= 1
    byte_ends = byte_offset + np.cumsum(lengths)
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


def spans_from_encoding(
    tokenizer: Any, text: str, ids: np.ndarray, offsets: np.ndarray, *, name: str = "tokenizer"
) -> TokenSpans:
    """Normalised spans for an existing encoding of ``text``: ``ids`` int [n], ``offsets`` int [n, 2] (chars)."""
    table = token_table(tokenizer, name)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if offsets.shape[0] != ids.shape[0]:
        raise ValueError(f"{name}: {ids.shape[0]} ids but {offsets.shape[0]} offsets")
    if ids.size and (ids.min() < 0 or ids.max() >= table.vocab_size):
        raise ValueError(f"{name}: token ids outside [0, {table.vocab_size}) for text {text[:60]!r}")
    text_bytes = text.encode("utf-8")
    index = _TextIndex(text, text_bytes)
    starts, ends = offsets[:, 0].copy(), offsets[:, 1].copy()
    whole = np.zeros(ids.shape[0], dtype=bool)

    is_special = table.byte_lengths[ids] < 0
    consuming_special = is_special & (ends > starts)  # a special token spelled out in the text splits it
    content = np.flatnonzero(~is_special)
    piece_of_content = np.cumsum(consuming_special)[content]
    special_positions = np.flatnonzero(consuming_special)
    piece_char_starts = np.concatenate([[0], ends[special_positions]])
    piece_char_ends = np.concatenate([starts[special_positions], [index.num_chars]])
    bounds = np.searchsorted(piece_of_content, np.arange(piece_char_starts.size + 1))
    for piece in range(piece_char_starts.size):  # one iteration per special-delimited piece, not per token
        members = content[bounds[piece] : bounds[piece + 1]]
        if members.size == 0:
            continue
        byte_start, byte_end = index.to_bytes(np.array([piece_char_starts[piece], piece_char_ends[piece]]))
        spans = _piece_spans_from_bytes(table, ids[members], text_bytes[byte_start:byte_end], int(byte_start), index)
        if spans is None:
            spans = _piece_spans_verified(table, ids[members], offsets[members], text_bytes, index)
        starts[members], ends[members], whole[members] = spans

    return TokenSpans(
        ids=ids,
        starts=starts,
        ends=ends,
        alignable=whole & _covers_alone(starts, ends),
        text_length=index.num_chars,
        fingerprint=table.fingerprint,
    )


def _covers_alone(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """bool [n]: the token's non-empty span overlaps no other token's span (tokens are in text order)."""
    nonempty = ends > starts
    big = np.iinfo(np.int64).max
    end_or_min = np.where(nonempty, ends, -1)
    start_or_max = np.where(nonempty, starts, big)
    max_end_before = np.concatenate([[-1], np.maximum.accumulate(end_or_min)[:-1]])
    min_start_after = np.concatenate([np.minimum.accumulate(start_or_max[::-1])[::-1][1:], [big]])
    return nonempty & (starts >= max_end_before) & (ends <= min_start_after)


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list]]:
    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        # the Rust call a fast tokenizer's __call__ makes, without the Python-side tensor conversion
        encodings = backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(enc.ids, enc.offsets) for enc in encodings]
    # truncation/padding left enabled on the backend by an earlier call: go through __call__, which resets it
    batch = tokenizer(
        texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, truncation=False, padding=False
    )
    return list(zip(batch["input_ids"], batch["offset_mapping"], strict=True))


def encode_with_spans(tokenizer: Any, text: str, *, add_special_tokens: bool = True) -> TokenSpans:
    """Tokenise ``text`` with a fast tokenizer; return ids with normalised character spans.

    ``ids`` equal ``tokenizer(text, add_special_tokens=...)["input_ids"]``. Raises ValueError for a slow
    tokenizer (no offsets) or an unsupported vocabulary convention.
    """
    token_table(tokenizer)  # refuses slow tokenizers with a clear error before encoding
    ((ids, offsets),) = _encode(tokenizer, [text], add_special_tokens)
    return spans_from_encoding(tokenizer, text, ids, offsets)


def encode_batch_with_spans(tokenizer: Any, texts: list[str], *, add_special_tokens: bool = True) -> list[TokenSpans]:
    """``encode_with_spans`` over many texts with one backend batch call."""
    token_table(tokenizer)
    encoded = _encode(tokenizer, list(texts), add_special_tokens)
    return [
        spans_from_encoding(tokenizer, text, ids, offsets) for text, (ids, offsets) in zip(texts, encoded, strict=True)
    ]
