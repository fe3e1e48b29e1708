"""Normalised token spans: agreement with the decoder reference, offset conventions, fallbacks, refusals."""

from __future__ import annotations

import copy
import unicodedata

import numpy as np
import pytest

from dskd_scale.alignment import (
    encode_batch_with_spans,
    encode_with_spans,
    exact_token_alignment,
    require_fast_tokenizer,
    spans_from_encoding,
    token_bytes,
)

pytestmark = pytest.mark.assets


def assert_alignable_tokens_spell_their_span(tokenizer, spans, text):
    raw = token_bytes(tokenizer)
    data = text.encode("utf-8")
    for position in np.flatnonzero(spans.alignable).tolist():
        piece = data[spans.byte_starts[position] : spans.byte_ends[position]]
        spelled = raw[spans.ids[position]]
        assert spelled == piece or (spans.byte_starts[position] == 0 and spelled == b" " + piece), (spelled, piece)


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5", "llama2", "mistral"])
def test_spans_agree_with_the_decoder_reference(name, all_texts, encoded):
    for index, text in enumerate(all_texts):
        spans, reference, byte_reference = encoded[name, index]
        assert spans.text_length == len(text) and spans.num_bytes == len(text.encode("utf-8"))
        reference_whole = np.array([bool(span and span[2]) for span in byte_reference])
        np.testing.assert_array_equal(spans.alignable, reference_whole, err_msg=repr(text[:80]))
        for position in np.flatnonzero(spans.alignable).tolist():
            assert (spans.byte_starts[position], spans.byte_ends[position]) == byte_reference[position][:2], text[:80]
            if reference[position][2]:  # alone in its character group: the character span is the group's
                assert (spans.starts[position], spans.ends[position]) == reference[position][:2], text[:80]


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5", "llama2", "mistral"])
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_are_exactly_what_the_tokenizer_call_gives(name, add_special_tokens, tokenizers, all_texts):
    tokenizer = tokenizers[name]
    texts = all_texts[::7]
    batch = encode_batch_with_spans(tokenizer, texts, add_special_tokens=add_special_tokens)
    for text, batched in zip(texts, batch, strict=True):
        expected = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        single = encode_with_spans(tokenizer, text, add_special_tokens=add_special_tokens)
        assert single.ids.dtype == np.int64 and single.starts.dtype == np.int64
        assert single.ids.tolist() == expected == batched.ids.tolist()
        np.testing.assert_array_equal(single.starts, batched.starts)
        np.testing.assert_array_equal(single.alignable, batched.alignable)


@pytest.mark.parametrize("name", ["gpt2", "qwen1.5"])
def test_trimmed_byte_level_offsets_give_the_same_spans(name, tokenizers, all_texts):
    """A ByteLevel post-processor with trim_offsets drops leading spaces from offsets (and yields odd
    empty offsets for space tokens); spans come from the bytes, so they must not change."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizers[name].backend_tokenizer)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trimming = PreTrainedTokenizerFast(tokenizer_object=backend)
    raw_offsets = trimming(" Hello  world", return_offsets_mapping=True)["offset_mapping"]
    assert raw_offsets[-1][0] == 8  # the post-processor really trims ('Ġworld' covers 7..13)
    for text in all_texts[::5]:
        plain, trimmed = encode_with_spans(tokenizers[name], text), encode_with_spans(trimming, text)
        np.testing.assert_array_equal(plain.ids, trimmed.ids)
        np.testing.assert_array_equal(plain.starts, trimmed.starts)
        np.testing.assert_array_equal(plain.ends, trimmed.ends)
        np.testing.assert_array_equal(plain.alignable, trimmed.alignable)


def test_sentencepiece_dummy_prefix_covers_no_text(tokenizers):
    text = " Hello world"
    mistral = encode_with_spans(tokenizers["mistral"], text)
    tokens = tokenizers["mistral"].convert_ids_to_tokens(mistral.ids.tolist())
    assert tokens[:3] == ["<s>", "▁", "▁Hello"]  # the dummy '▁' and '▁Hello' both claim character 0
    assert (mistral.starts[1], mistral.ends[1], mistral.alignable[1]) == (0, 0, False)
    assert (mistral.starts[2], mistral.ends[2], mistral.alignable[2]) == (0, 6, True)
    gpt2 = encode_with_spans(tokenizers["gpt2"], text)
    positions_g, positions_m = exact_token_alignment(gpt2, mistral)
    assert positions_g.tolist() == [0, 1] and positions_m.tolist() == [2, 3]
    assert not mistral.alignable[0] and mistral.starts[0] == mistral.ends[0]  # BOS: empty, never aligned


def test_multibyte_pieces_share_a_character_span_and_have_their_own_bytes(tokenizers):
    text = "a🙂b"
    for name in ("gpt2", "llama2"):  # gpt2: 'ðŁ','ĻĤ'; llama2: four '<0xNN>' byte-fallback tokens
        spans = encode_with_spans(tokenizers[name], text)
        emoji = (spans.starts == 1) & (spans.ends == 2)
        assert emoji.sum() >= 2 and spans.alignable[emoji].all()
        np.testing.assert_array_equal(spans.byte_starts[emoji][1:], spans.byte_ends[emoji][:-1])
        assert spans.byte_starts[emoji][0] == 1 and spans.byte_ends[emoji][-1] == 5  # the emoji's 4 bytes
        assert spans.alignable[spans.starts == 0].any() and spans.alignable[spans.starts == 2].any()
        assert_alignable_tokens_spell_their_span(tokenizers[name], spans, text)


def test_pieces_of_one_character_pair_when_both_sides_split_it_at_the_same_bytes(tokenizers):
    """Byte-level completeness: 'æĸ','ĩ' (文 split after 2 bytes) on one side pairs with the same pieces on
    another tokenizer: GPT-2 against Qwen with the two merges that make 文 and 中文 whole removed (same vocabulary,
    so only the split differs)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizers["qwen1.5"].backend_tokenizer.to_str())
    removed = {"ä¸Ńæĸĩ", "æĸĩ"}  # 中文 and 文 as single Qwen tokens
    state["model"]["merges"] = [m for m in state["model"]["merges"]
                                if (m if isinstance(m, str) else " ".join(m)).replace(" ", "") not in removed]
    variant = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)))
    text = "中文"
    spans_v, spans_g = encode_with_spans(variant, text), encode_with_spans(tokenizers["gpt2"], text)
    assert variant.convert_ids_to_tokens(spans_v.ids.tolist()) == ["ä¸Ń", "æĸ", "ĩ"]
    assert tokenizers["gpt2"].convert_ids_to_tokens(spans_g.ids.tolist()) == ["ä¸Ń", "æĸ", "ĩ"]
    positions_v, positions_g = exact_token_alignment(spans_v, spans_g)
    assert positions_v.tolist() == positions_g.tolist() == [0, 1, 2]  # 'æĸ' and 'ĩ' are pieces of 文


def test_normaliser_rewritten_text_falls_back_to_verified_offsets(tokenizers):
    """Qwen's NFC normaliser rewrites decomposed accents: token bytes no longer tile the text. Tokens whose
    bytes still equal the text they cover stay alignable; the others are refused, never mis-aligned."""
    text = unicodedata.normalize("NFD", "Un café très léger") + " and plain words after it"
    qwen, gpt2 = encode_with_spans(tokenizers["qwen1.5"], text), encode_with_spans(tokenizers["gpt2"], text)
    assert_alignable_tokens_spell_their_span(tokenizers["qwen1.5"], qwen, text)
    assert_alignable_tokens_spell_their_span(tokenizers["gpt2"], gpt2, text)
    for mark in [i for i, char in enumerate(text) if unicodedata.combining(char)]:
        rewritten = (qwen.starts < mark + 1) & (qwen.ends > mark - 1)  # base letter + mark became one character
        assert rewritten.any() and not qwen.alignable[rewritten].any()
    positions_q, positions_g = exact_token_alignment(qwen, gpt2)
    aligned = {text[qwen.starts[i] : qwen.ends[i]] for i in positions_q.tolist()}
    assert {" and", " plain", " words", " after", " it", "Un"} <= aligned


@pytest.mark.parametrize(
    "name,text,literal",
    [
        ("gpt2", "Hello<|endoftext|>world", "<|endoftext|>"),
        ("qwen1.5", "Hi <|im_end|> there", "<|im_end|>"),
        ("llama2", "one</s>two three", "</s>"),
    ],
)
def test_special_tokens_spelled_in_the_text_split_it_and_never_align(name, text, literal, tokenizers):
    tokenizer = tokenizers[name]
    spans = encode_with_spans(tokenizer, text)
    special = np.isin(spans.ids, tokenizer.all_special_ids)
    start = text.index(literal)
    spelled = special & (spans.starts == start)
    assert spelled.sum() == 1 and spans.ends[spelled][0] == start + len(literal)
    assert not spans.alignable[special].any()
    assert_alignable_tokens_spell_their_span(tokenizer, spans, text)
    after = np.flatnonzero(spans.starts >= start + len(literal))
    assert spans.alignable[after].all(), tokenizer.convert_ids_to_tokens(spans.ids[after].tolist())


def test_truncation_left_on_the_backend_is_not_applied(asset):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(asset("tokenizers/gpt2")))
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    text = "a sentence that is clearly longer than three tokens"
    spans = encode_with_spans(tokenizer, text)
    assert len(spans) > 3 and spans.ends[-1] == len(text)


def test_slow_tokenizer_is_refused_with_its_name(tokenizers):
    class SlowTokenizer:
        is_fast = False
        name_or_path = "some/slow-model"

    with pytest.raises(ValueError, match=r"student tokenizer: .*SlowTokenizer.*some/slow-model.*not a fast"):
        require_fast_tokenizer(SlowTokenizer(), "student tokenizer")
    with pytest.raises(ValueError, match="not a fast tokenizer"):
        encode_with_spans(SlowTokenizer(), "text")
    require_fast_tokenizer(tokenizers["gpt2"], "teacher tokenizer")  # fast ones pass


def test_unsupported_vocabulary_convention_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "##s": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="unsupported tokenizer model WordPiece"):
        encode_with_spans(wordpiece, "hellos")


def test_bad_encodings_are_refused(tokenizers):
    with pytest.raises(ValueError, match="outside"):
        spans_from_encoding(tokenizers["llama2"], "x", [32000], [(0, 1)], name="student tokenizer")
    with pytest.raises(ValueError, match="2 ids but 1 offsets"):
        spans_from_encoding(tokenizers["llama2"], "x", [1, 2], [(0, 1)])
