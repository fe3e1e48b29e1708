"""Shared fixtures for the alignment tests: the four real tokenizers (loaded once) and test texts."""

from __future__ import annotations

import json

import pytest

from dskd_scale.utils.assets import asset_path, missing_asset_reason

TOKENIZER_NAMES = ("gpt2", "qwen1.5", "llama2", "mistral")
VECTOR_FILES = ("gpt-2", "llama-spm", "qwen2", "llama-bpe")

ADVERSARIAL_TEXTS = (
    "Hello\n\nworld é  x\t🙂中文",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\t\ttabs\n\t\tindented\n",
    "Ünïcödé àccents: café, naïve, résumé, Ærøskøbing, ß",
    "CJK: 日本語のテキストと中文文本，한국어 텍스트。",
    "emoji 🙂🙃 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽 keycap 1️⃣",
    "mixed\r\nline\rendings\n\n\n\nand    many     spaces",
    "Arabic مرحبا بالعالم, Hebrew שלום עולם, Hindi नमस्ते दुनिया, Thai สวัสดีชาวโลก",
    "code:\n    def f(x):\n        return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2 ≤ ∞; π ≈ 3.14159; 1/2 ½ ⅓",
    "zero\u200bwidth\u00a0nbsp\u2009thin\u3000ideographic space",
    "",
    " ",
    "é",
    "\n",
    "a" * 300 + " " + "z" * 5,
)


def _load_tokenizer(name: str):
    path = asset_path(f"tokenizers/{name}")
    if path is None:
        pytest.skip(missing_asset_reason(f"tokenizers/{name}"))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    """name -> fast tokenizer, for the four asset tokenizers (skips when any is absent)."""
    return {name: _load_tokenizer(name) for name in TOKENIZER_NAMES}


@pytest.fixture(scope="session")
def dolly_texts() -> list[str]:
    """Prompt + response of the first Dolly valid rows (training-shaped text)."""
    path = asset_path("data/dolly/valid.jsonl")
    if path is None:
        pytest.skip(missing_asset_reason("data/dolly/valid.jsonl"))
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:16]]
    return [row["prompt"] + row["output"] for row in rows]


@pytest.fixture(scope="session")
def vector_texts() -> list[str]:
    """llama.cpp's tokenizer test strings (46 per file), deduplicated across the four files."""
    texts: dict[str, None] = {}
    for name in VECTOR_FILES:
        path = asset_path(f"tokenizer_vectors/ggml-vocab-{name}.gguf.inp")
        if path is None:
            pytest.skip(missing_asset_reason(f"tokenizer_vectors/ggml-vocab-{name}.gguf.inp"))
        for text in path.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n"):
            texts[text] = None
    return list(texts)


@pytest.fixture(scope="session")
def all_texts(dolly_texts, vector_texts) -> list[str]:
    """Dolly + llama.cpp vectors + adversarial strings (newlines, tabs, CJK, emoji, accents, spaces).

    All are texts no tokenizer here rewrites (NFC): the decoder-based reference needs decode(encode(t)) == t.
    """
    return [*dolly_texts, *vector_texts, *ADVERSARIAL_TEXTS]


@pytest.fixture(scope="session")
def encoded(tokenizers, all_texts):
    """(tokenizer name, text index) -> (TokenSpans, reference character spans, reference byte spans), computed once
    for all tests."""
    from alignment_reference import reference_byte_spans, reference_spans

    from dskd_scale.alignment import encode_with_spans

    cache = {}
    for name, tokenizer in tokenizers.items():
        for index, text in enumerate(all_texts):
            spans = encode_with_spans(tokenizer, text)
            reference = reference_spans(tokenizer, spans.ids.tolist(), text)
            byte_reference = reference_byte_spans(tokenizer, spans.ids.tolist(), text, reference)
            cache[name, index] = (spans, reference, byte_reference)
    return cache
