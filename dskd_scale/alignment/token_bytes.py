"""The raw bytes every token id stands for, computed once per tokenizer and cached.

Exact token alignment and the vocabulary map compare tokens by the bytes of text they stand for, never by
their surface strings: byte-level BPE spells a leading space 'Ġ' and a newline 'Ċ', SentencePiece spells the
space '▁' and a newline '<0x0A>', and a Llama vocabulary even holds a literal 'Ġ' (U+0120) token. Decoding
each convention back to bytes makes "same text" mean the same thing on every tokenizer.

Only duck-typed Hugging Face fast tokenizers are needed (``backend_tokenizer``, ``added_tokens_decoder``,
``all_special_ids``, ``len()``); this module imports neither transformers nor torch.
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

SENTENCEPIECE_SPACE = "\u2581"  # '▁'
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-character table (openai/gpt-2 encoder.py), inverted: char -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


_BYTE_LEVEL_CHAR_TO_BYTE = _gpt2_byte_alphabet()
# str.translate table: byte-level alphabet char -> the latin-1 char of its byte, so that .encode("latin-1")
# yields the raw bytes; any character outside the alphabet survives and makes the encode fail (-> None).
_BYTE_LEVEL_TRANSLATION = {ord(char): byte for char, byte in _BYTE_LEVEL_CHAR_TO_BYTE.items()}


def require_fast_tokenizer(tokenizer: Any, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``tokenizer`` is a fast (Rust-backed) tokenizer with offsets.

    Exact token alignment needs character offsets (``return_offsets_mapping``) and the backend's vocabulary,
    which slow (pure Python / sentencepiece) tokenizers do not provide.
    """
    if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is not None:
        return
    source = getattr(tokenizer, "name_or_path", None) or "<unknown path>"
    raise ValueError(
        f"{name}: tokenizer {type(tokenizer).__name__} loaded from '{source}' is not a fast tokenizer; exact token "
        "alignment needs character offsets (return_offsets_mapping), which only fast tokenizers provide. Load it "
        "with AutoTokenizer.from_pretrained(..., use_fast=True) from a folder that has a tokenizer.json."
    )


@dataclass(frozen=True)
class _Convention:
    """How one tokenizer spells bytes in its vocabulary."""

    byte_level: bool  # GPT-2 style printable-byte alphabet ('Ġ' = space, 'Ċ' = newline)
    metaspace: bool  # SentencePiece style '▁' = space
    byte_fallback: bool  # '<0xNN>' tokens stand for the single byte NN


def _component_json(component: Any) -> str:
    if component is None:
        return ""
    state = component.__getstate__()
    return state.decode("utf-8") if isinstance(state, bytes) else json.dumps(state)


def _detect_convention(tokenizer: Any, name: str) -> _Convention:
    backend = tokenizer.backend_tokenizer
    model = backend.model
    model_type = type(model).__name__
    if model_type not in ("BPE", "Unigram"):
        raise ValueError(
            f"{name}: unsupported tokenizer model {model_type} ({getattr(tokenizer, 'name_or_path', '?')}); exact "
            "token alignment supports byte-level BPE and SentencePiece-style BPE/Unigram vocabularies"
        )
    for attribute in ("continuing_subword_prefix", "end_of_word_suffix"):
        if getattr(model, attribute, None):
            raise ValueError(
                f"{name}: tokenizer model uses {attribute}={getattr(model, attribute)!r}, whose tokens do not stand "
                "for plain text bytes; exact token alignment does not support it"
            )
    pipeline = "".join(_component_json(part) for part in (backend.normalizer, backend.pre_tokenizer, backend.decoder))
    byte_level = '"ByteLevel"' in pipeline
    return _Convention(
        byte_level=byte_level,
        metaspace=not byte_level and SENTENCEPIECE_SPACE in pipeline,
        byte_fallback=bool(getattr(model, "byte_fallback", False)),
    )


def _vocab_token_bytes(token: str, convention: _Convention) -> bytes | None:
    if convention.byte_level:
        try:
            return token.translate(_BYTE_LEVEL_TRANSLATION).encode("latin-1")
        except UnicodeEncodeError:
            return None  # a character outside the byte alphabet: not a byte-level vocabulary entry
    if convention.byte_fallback:
        match = _BYTE_FALLBACK_TOKEN.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)])
    if convention.metaspace:
        token = token.replace(SENTENCEPIECE_SPACE, " ")
    return token.encode("utf-8")


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Per-tokenizer byte table, built once and cached (see ``token_table``).

    - ``token_bytes[i]``: raw bytes id ``i`` stands for, None for special tokens and ids with no entry.
    - ``byte_lengths`` int64 [len(tokenizer)]: ``len(token_bytes[i])``, −1 where None.
    - ``bytes_array``: object ndarray of ``token_bytes`` (fancy-indexable for a vectorised join).
    - ``byte_fallback`` bool [len(tokenizer)]: id is a '<0xNN>' byte-fallback token.
    - ``leading_spaces`` int64 [len(tokenizer)]: number of space bytes the token's bytes start with (the
      word-boundary marker 'Ġ'/'▁' the paper's whitespace-insensitive matching removes).
    - ``special_ids``: ids with no bytes of their own (BOS, EOS, PAD, UNK, chat markers, ...).
    - ``fingerprint``: sha256 over the whole byte table; equal fingerprints mean identical tokenizations.
    """

    token_bytes: list[bytes | None]
    byte_lengths: np.ndarray
    bytes_array: np.ndarray
    byte_fallback: np.ndarray
    leading_spaces: np.ndarray
    special_ids: frozenset[int]
    fingerprint: str
    vocab_size: int


def _build_table(tokenizer: Any, name: str) -> TokenTable:
    require_fast_tokenizer(tokenizer, name)
    convention = _detect_convention(tokenizer, name)
    size = len(tokenizer)
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    strings: list[str | None] = [None] * size
    for token, token_id in vocab.items():
        if 0 <= token_id < size:
            strings[token_id] = token
    special_ids = {int(i) for i in tokenizer.all_special_ids if 0 <= i < size}
    added_literal: dict[int, bytes] = {}
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if not 0 <= token_id < size:
            continue
        if added.special:
            special_ids.add(int(token_id))
        else:  # a user-added plain token is matched literally in the text, not through the model's alphabet
            added_literal[int(token_id)] = added.content.encode("utf-8")
    table: list[bytes | None] = [None] * size
    fallback = np.zeros(size, dtype=bool)
    for token_id, token in enumerate(strings):
        if token is None or token_id in special_ids:
            continue
        if token_id in added_literal:
            table[token_id] = added_literal[token_id]
            continue
        table[token_id] = _vocab_token_bytes(token, convention)
        if convention.byte_fallback and _BYTE_FALLBACK_TOKEN.fullmatch(token):
            fallback[token_id] = True
    lengths = np.fromiter((-1 if b is None else len(b) for b in table), dtype=np.int64, count=size)
    bytes_array = np.empty(size, dtype=object)
    bytes_array[:] = [b"" if b is None else b for b in table]
    leading_spaces = np.fromiter((0 if b is None else len(b) - len(b.lstrip(b" ")) for b in table),
                                 dtype=np.int64, count=size)
    digest = hashlib.sha256()
    digest.update(lengths.tobytes())
    digest.update(b"".join(bytes_array.tolist()))
    return TokenTable(
        token_bytes=table,
        byte_lengths=lengths,
        bytes_array=bytes_array,
        byte_fallback=fallback,
        leading_spaces=leading_spaces,
        special_ids=frozenset(special_ids),
        fingerprint=digest.hexdigest(),
        vocab_size=size,
    )


_TABLES: weakref.WeakKeyDictionary[Any, TokenTable] = weakref.WeakKeyDictionary()
_TABLES_BY_ID: dict[int, tuple[Any, TokenTable]] = {}  # for tokenizers that cannot be weakly referenced


def token_table(tokenizer: Any, name: str = "tokenizer") -> TokenTable:
    """The cached ``TokenTable`` of ``tokenizer`` (rebuilt if tokens were added since it was cached)."""
    try:
        cached = _TABLES.get(tokenizer)
    except TypeError:
        entry = _TABLES_BY_ID.get(id(tokenizer))
        cached = entry[1] if entry is not None and entry[0] is tokenizer else None
    if cached is not None and cached.vocab_size == len(tokenizer):
        return cached
    table = _build_table(tokenizer, name)
    try:
        _TABLES[tokenizer] = table
    except TypeError:
        _TABLES_BY_ID[id(tokenizer)] = (tokenizer, table)
    return table


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Raw bytes each id in ``range(len(tokenizer))`` stands for; None for special tokens and unknown ids.

    Byte-level BPE characters are decoded back to bytes ('Ġ' -> b' '), SentencePiece's '▁' becomes a space
    and '<0xNN>' byte-fallback tokens become the single byte NN. Cached per tokenizer object.
    """
    return token_table(tokenizer).token_bytes
