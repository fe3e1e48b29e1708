"""ROUGE-L and exact match against the rouge-score package and hand-computed values."""

from __future__ import annotations

import json

import pytest
from rouge_score import rouge_scorer

from dskd_scale.eval.metrics import exact_match, normalize_answer, rouge_l, text_metrics


def test_rouge_l_hand_checked_lcs():
    # tokens: the cat sat on the mat / the cat is on the mat; LCS "the cat on the mat" = 5 of 6 -> P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * 5 / 6)
    # LCS 2 ("a", "c"), precision 2/3, recall 2/2 -> F = 2PR/(P+R) = 0.8
    assert rouge_l("a b c", "a c") == pytest.approx(80.0)


def test_rouge_l_uses_the_porter_stemmer_and_default_tokenizer():
    assert rouge_l("running dogs", "run dog") == pytest.approx(100.0)  # 0 without stemming
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(100.0)
    assert rouge_l("", "anything") == 0.0


def test_rouge_l_takes_the_best_reference():
    assert rouge_l("the cat sat", ["completely different words", "the cat sat"]) == pytest.approx(100.0)
    assert rouge_l("the cat sat", ["the dog sat", "nothing"]) == pytest.approx(100 * 2 / 3)


def test_rouge_l_matches_rouge_score_on_real_pairs(asset):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rows = [json.loads(line) for line in asset("data/dolly/valid.jsonl").read_text().splitlines()[:25]]
    pairs = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]["output"]
        words = row["output"].split()
        pairs += [(" ".join(words[::2]), row["output"]), (other, row["output"]), (row["output"].upper(), row["output"])]
    for prediction, reference in pairs:
        expected = 100 * scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-9)
    assert any(0 < rouge_l(p, r) < 100 for p, r in pairs)


def test_exact_match_normalisation_keeps_articles():
    assert normalize_answer("  The  Answer, is: 42! ") == "the answer is 42"
    assert exact_match("the answer is 42.", ["nope", "The answer is 42"]) == 100.0
    assert exact_match("answer is 42", "The answer is 42") == 0.0  # articles are not removed (reference code)


def test_text_metrics_are_corpus_means():
    metrics = text_metrics(["the cat sat", "x"], ["the cat sat", "y"])
    assert metrics == {"rougeL": pytest.approx(50.0), "exact_match": pytest.approx(50.0)}
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        rouge_l("a", [])
