"""Tokenizer families not among the assets, trained on the fly: the alignment must stay byte-span optimal.

- a RoBERTa-style byte-level BPE that prepends a dummy space and trims offsets in its post-processor;
- a SentencePiece-style Unigram with Metaspace(prepend_scheme="always") and an unk token, no byte fallback;
- an NFKC-normalising BPE (text rewritten by the normaliser: soundness only).
"""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from alignment_reference import brute_force_pairs, reference_byte_spans, reference_spans, strip_leading_spaces

from dskd_scale.alignment import encode_with_spans, exact_token_alignment, token_bytes

pytestmark = pytest.mark.assets


def _wrap(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture(scope="module")
def training_texts(all_texts):
    return all_texts


@pytest.fixture(scope="module")
def trained(training_texts):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    roberta = Tokenizer(models.BPE())
    roberta.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    roberta.decoder = decoders.ByteLevel()
    roberta.post_processor = processors.ByteLevel(trim_offsets=True)
    roberta.train_from_iterator(
        training_texts,
        trainers.BpeTrainer(
            vocab_size=700, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    unigram.decoder = decoders.Metaspace(prepend_scheme="always")
    unigram.train_from_iterator(
        training_texts, trainers.UnigramTrainer(vocab_size=900, special_tokens=["<unk>", "</s>"], unk_token="<unk>")
    )
    nfkc = Tokenizer(models.BPE())
    nfkc.normalizer = normalizers.NFKC()
    nfkc.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    nfkc.decoder = decoders.ByteLevel()
    nfkc.train_from_iterator(
        training_texts,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return {
        "roberta": _wrap(roberta, eos_token="</s>"),
        "unigram": _wrap(unigram, eos_token="</s>", unk_token="<unk>"),
        "nfkc": _wrap(nfkc, eos_token="</s>"),
    }


def _reference(tokenizer, spans, text):
    """Byte spans of the decoder reference."""
    full = tokenizer.backend_tokenizer.decode(spans.ids.tolist(), skip_special_tokens=True)
    if full == " " + text:  # the RoBERTa decoder keeps its dummy prefix space: decode the text as it reads
        characters = reference_spans(tokenizer, spans.ids.tolist(), " " + text, drop_leading=1)
    else:
        characters = reference_spans(tokenizer, spans.ids.tolist(), text)
    return reference_byte_spans(tokenizer, spans.ids.tolist(), text, characters)


@pytest.fixture(scope="module")
def family_encoded(trained, tokenizers, training_texts):
    """name -> [(TokenSpans, reference) or None when the text holds an unknown character], every 3rd text."""
    family = {"roberta": trained["roberta"], "unigram": trained["unigram"], **tokenizers}
    cache = {}
    for name in ("roberta", "unigram", "gpt2", "llama2"):
        tokenizer, rows = family[name], []
        for text in training_texts[::3]:
            spans = encode_with_spans(tokenizer, text)
            known = tokenizer.unk_token_id is None or tokenizer.unk_token_id not in spans.ids
            rows.append((spans, _reference(tokenizer, spans, text), text) if known else None)
        cache[name] = rows
    return cache


@pytest.mark.parametrize(
    "pair",
    [("roberta", "unigram"), ("roberta", "gpt2"), ("roberta", "llama2"), ("unigram", "gpt2"), ("unigram", "llama2")],
    ids="<->".join,
)
def test_trained_families_reach_the_byte_span_optimum(pair, family_encoded):
    checked = 0
    for row_a, row_b in zip(family_encoded[pair[0]], family_encoded[pair[1]], strict=True):
        if row_a is None or row_b is None:
            continue  # an unknown character: the decoder reference cannot spell the text back
        (spans_a, reference_a, text), (spans_b, reference_b, _) = row_a, row_b
        positions_a, positions_b = exact_token_alignment(spans_a, spans_b)
        pairs = set(zip(positions_a.tolist(), positions_b.tolist(), strict=True))
        assert pairs == brute_force_pairs(reference_a, reference_b), pair
        paper_a, paper_b = exact_token_alignment(spans_a, spans_b, whitespace="paper")
        paper = set(zip(paper_a.tolist(), paper_b.tolist(), strict=True))
        assert paper == brute_force_pairs(strip_leading_spaces(reference_a, text),
                                          strip_leading_spaces(reference_b, text)), pair
        assert pairs <= paper
        checked += 1
    assert checked > 15


def test_trimmed_prefix_space_family_spans_cover_the_space(trained):
    """RoBERTa-style offsets leave the leading space of 'Ġ...' tokens out; spans must tile the text."""
    text = "hello world, hello again"
    spans = encode_with_spans(trained["roberta"], text)
    offsets = np.asarray(trained["roberta"](text, return_offsets_mapping=True)["offset_mapping"])
    assert np.any(offsets[1:, 0] > offsets[:-1, 1])  # the tokenizer's own offsets leave gaps (trimmed spaces)
    assert spans.starts[0] == 0 and spans.ends[-1] == len(text)  # the dummy prefix space covers no text
    np.testing.assert_array_equal(spans.starts[1:], spans.ends[:-1])
    assert spans.alignable.all()
    for position, raw in enumerate(token_bytes(trained["roberta"])[i] for i in spans.ids.tolist()):
        piece = text[spans.starts[position] : spans.ends[position]]
        assert raw.decode() == piece or (position == 0 and raw.decode() == " " + piece)


def test_unknown_tokens_split_the_text_and_never_align(trained, tokenizers):
    text = "plain words \u2603\u2604 and more words"  # characters the trained Unigram never saw
    unigram = trained["unigram"]
    spans = encode_with_spans(unigram, text)
    unknown = np.flatnonzero(spans.ids == unigram.unk_token_id)
    assert unknown.size == 1 and not spans.alignable[unknown].any()
    assert (spans.starts[unknown[0]], spans.ends[unknown[0]]) == (12, 14)
    others = np.arange(len(spans)) != unknown[0]
    assert spans.alignable[others].all()  # the pieces before and after the unknown characters still tile
    np.testing.assert_array_equal(spans.starts[1:], spans.ends[:-1])
    positions_u, positions_g = exact_token_alignment(spans, encode_with_spans(tokenizers["gpt2"], text))
    assert unknown[0] not in positions_u.tolist() and positions_u.size == positions_g.size


def test_nfkc_rewritten_text_aligns_soundly(trained, tokenizers):
    text = "ﬁne ½ Ⅻ café " + unicodedata.normalize("NFD", "déjà vu") + " and ordinary words"
    nfkc = trained["nfkc"]
    spans_n, spans_g = encode_with_spans(nfkc, text), encode_with_spans(tokenizers["gpt2"], text)
    positions_n, positions_g = exact_token_alignment(spans_n, spans_g)
    raw_n, raw_g = token_bytes(nfkc), token_bytes(tokenizers["gpt2"])
    for i, j in zip(positions_n.tolist(), positions_g.tolist(), strict=True):
        piece = text[spans_n.starts[i] : spans_n.ends[i]]
        assert raw_n[spans_n.ids[i]].decode() == piece == raw_g[spans_g.ids[j]].decode()
    assert positions_n.size > 0 and np.all(np.diff(positions_n) > 0)
