"""Exact token alignment on real tokenizers: soundness, optimality, identity, symmetry, anchor regression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from alignment_reference import brute_force_pairs

from dskd_scale.alignment import encode_with_spans, exact_token_alignment, token_bytes

pytestmark = pytest.mark.assets

CROSS_PAIRS = [pair for pair in itertools.permutations(("gpt2", "qwen1.5", "llama2", "mistral"), 2)]


def token_text(tokenizer_bytes, token_id: int) -> str:
    return tokenizer_bytes[token_id].decode("utf-8")


@pytest.mark.parametrize("pair", CROSS_PAIRS, ids=lambda pair: f"{pair[0]}->{pair[1]}")
def test_alignment_is_sound_monotone_and_reaches_the_brute_force_optimum(pair, tokenizers, all_texts, encoded):
    name_a, name_b = pair
    bytes_a, bytes_b = token_bytes(tokenizers[name_a]), token_bytes(tokenizers[name_b])
    total_aligned = 0
    for index, text in enumerate(all_texts):
        spans_a, reference_a = encoded[name_a, index]
        spans_b, reference_b = encoded[name_b, index]
        positions_a, positions_b = exact_token_alignment(spans_a, spans_b)
        assert positions_a.dtype == np.int64 and positions_b.dtype == np.int64
        assert positions_a.shape == positions_b.shape
        assert np.all(np.diff(positions_a) > 0) and np.all(np.diff(positions_b) > 0), text
        assert set(zip(positions_a.tolist(), positions_b.tolist(), strict=True)) == brute_force_pairs(
            reference_a, reference_b
        ), f"{name_a}->{name_b} differs from the exact-span optimum on {text[:80]!r}"
        for i, j in zip(positions_a.tolist(), positions_b.tolist(), strict=True):
            start, end = spans_a.starts[i], spans_a.ends[i]
            assert (start, end) == (spans_b.starts[j], spans_b.ends[j])
            piece = text[start:end]
            # each token's own bytes spell that text (a SentencePiece dummy prefix space only at the text start)
            for raw in (token_text(bytes_a, spans_a.ids[i]), token_text(bytes_b, spans_b.ids[j])):
                assert raw == piece or (start == 0 and raw == " " + piece), (raw, piece)
        total_aligned += positions_a.size
    assert total_aligned > 1000  # the texts really exercise the pair


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5", "llama2", "mistral"])
def test_identical_tokenizers_give_the_identity(name, tokenizers, all_texts, encoded):
    for index, text in enumerate(all_texts):
        spans, _ = encoded[name, index]
        positions_a, positions_b = exact_token_alignment(spans, spans)
        covering = np.flatnonzero(spans.ends > spans.starts)
        np.testing.assert_array_equal(positions_a, covering)
        np.testing.assert_array_equal(positions_b, covering)
        content = ~np.isin(spans.ids, tokenizers[name].all_special_ids)
        assert np.all(content[covering]) and content.sum() - covering.size <= 1, text  # at most a dummy prefix


def test_identity_holds_for_a_separately_loaded_copy(tokenizers, asset):
    from transformers import AutoTokenizer

    copy = AutoTokenizer.from_pretrained(str(asset("tokenizers/gpt2")))
    text = "emoji 🙂🙃 family 👨‍👩‍👧‍👦"  # byte pieces that never align across different tokenizers
    original, reloaded = encode_with_spans(tokenizers["gpt2"], text), encode_with_spans(copy, text)
    positions_a, positions_b = exact_token_alignment(original, reloaded)
    np.testing.assert_array_equal(positions_a, np.arange(len(original)))
    np.testing.assert_array_equal(positions_b, np.arange(len(original)))
    assert not original.alignable.all()  # the identity includes the multi-byte pieces


@pytest.mark.parametrize("pair", CROSS_PAIRS[::2], ids=lambda pair: f"{pair[0]}<->{pair[1]}")
def test_swapping_sides_swaps_the_pairs(pair, all_texts, encoded):
    for index in range(len(all_texts)):
        spans_a, spans_b = encoded[pair[0], index][0], encoded[pair[1], index][0]
        forward_a, forward_b = exact_token_alignment(spans_a, spans_b)
        backward_b, backward_a = exact_token_alignment(spans_b, spans_a)
        np.testing.assert_array_equal(forward_a, backward_a)
        np.testing.assert_array_equal(forward_b, backward_b)


@pytest.mark.parametrize("teacher,student", [("qwen1.5", "llama2"), ("llama2", "qwen1.5"), ("gpt2", "mistral")])
def test_anchor_desync_regression_words_after_newline_and_accent_align(teacher, student, tokenizers):
    """The anchor's greedy scan never re-syncs after 'Ċ' vs '<0x0A>' or 'Ã©' vs 'é'; span alignment does."""
    text = "Le café est fermé.\nThe shop is open and the menu is long, so we wait for the owner."
    spans_t = encode_with_spans(tokenizers[teacher], text)
    spans_s = encode_with_spans(tokenizers[student], text)
    positions_t, positions_s = exact_token_alignment(spans_t, spans_s)
    aligned_text = {text[spans_s.starts[j] : spans_s.ends[j]] for j in positions_s.tolist()}
    after_newline = {" shop", " is", " open", " and", " the", " menu", " long", " so", " we", " wait", " owner"}
    assert after_newline <= aligned_text, after_newline - aligned_text
    assert " est" in aligned_text  # right after the first 'é'


def test_spans_of_different_texts_are_refused(tokenizers):
    first = encode_with_spans(tokenizers["gpt2"], "one text")
    second = encode_with_spans(tokenizers["llama2"], "another text")
    with pytest.raises(ValueError, match="different texts"):
        exact_token_alignment(first, second)


def test_long_document_aligns_soundly(tokenizers, dolly_texts):
    """A ~40k-character document (quadratic reference is too slow): soundness and monotonicity only."""
    text = "\n\n".join(dolly_texts * 3)
    spans_q = encode_with_spans(tokenizers["qwen1.5"], text)
    spans_l = encode_with_spans(tokenizers["llama2"], text)
    positions_q, positions_l = exact_token_alignment(spans_q, spans_l)
    assert np.all(np.diff(positions_q) > 0) and np.all(np.diff(positions_l) > 0)
    bytes_q, bytes_l = token_bytes(tokenizers["qwen1.5"]), token_bytes(tokenizers["llama2"])
    for i, j in zip(positions_q.tolist(), positions_l.tolist(), strict=True):
        piece = text[spans_q.starts[i] : spans_q.ends[i]]
        assert bytes_q[spans_q.ids[i]].decode() == piece == text[spans_l.starts[j] : spans_l.ends[j]]
        assert bytes_l[spans_l.ids[j]].decode() in (piece, " " + piece)
    assert positions_l.size > 0.6 * np.count_nonzero(spans_l.alignable)
