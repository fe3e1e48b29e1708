"""Text metrics of the DSKD/MiniLLM protocol: stemmed ROUGE-L F1 and exact match, max over references.

Both follow the natural-instructions / MiniLLM ``rouge_metric.py`` the DSKD papers report with: ROUGE-L is the
``rouge-score`` package's rougeL F-measure with the Porter stemmer and its default tokenizer (lower-case,
alphanumeric words only), exact match compares answers after lower-casing, removing ASCII punctuation and
collapsing whitespace (SQuAD normalisation *without* article removal). Per-example scores are in [0, 100].
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from functools import lru_cache

_PUNCTUATION = str.maketrans("", "", string.punctuation)


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    # Building a RougeScorer loads the Porter stemmer; build it once per process.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def as_references(reference: str | Sequence[str]) -> list[str]:
    """A reference field as a non-empty list of strings (the data may hold one string or a list)."""
    references = [reference] if isinstance(reference, str) else list(reference)
    if not references or not all(isinstance(item, str) for item in references):
        raise ValueError(f"references must be a string or a non-empty list of strings, got {reference!r}")
    return references


def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """Stemmed ROUGE-L F1 × 100 of ``prediction``, the maximum over the reference(s)."""
    scorer = _rouge_l_scorer()
    return 100.0 * max(scorer.score(target, prediction)["rougeL"].fmeasure for target in as_references(reference))


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (articles are kept, as in the reference code)."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """100.0 when the normalised prediction equals one of the normalised references, else 0.0."""
    normalized = normalize_answer(prediction)
    return 100.0 if any(normalized == normalize_answer(target) for target in as_references(reference)) else 0.0


def text_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Corpus means of ``rougeL`` and ``exact_match`` (each in [0, 100]) over paired predictions/references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("text_metrics needs at least one prediction")
    count = len(predictions)
    return {
        "rougeL": sum(rouge_l(p, r) for p, r in zip(predictions, references, strict=True)) / count,
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True)) / count,
    }
