"""Final-answer extraction for GSM8K-style math answers.

The extractor looks, in order of how explicit the model was, for: the number after the first ``####`` marker
(the GSM8K reference format and the few-shot prompt's), the number after the last "answer is", the number in the
last ``\\boxed{...}``, and finally the last number anywhere in the text. Numbers are canonicalised so that
``1,600``, ``$1600.00``, ``1600.`` and ``1600 dollars`` all compare equal.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: optional sign, optional currency, digits with optional thousands separators, optional decimals.
# A minus sign only counts when it does not follow a word character ("3-5" is a range, not -5).
_SIGN = r"(?:(?<![\w)])[-−])?"
_NUMBER = _SIGN + r"[$€£]?\s*(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_MARKER_RE = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")


def canonical_number(text: str) -> str | None:
    """A number written as text in canonical form (``"1,600.00"`` -> ``"1600"``), or None if it is not one."""
    cleaned = re.sub(r"[\s,$€£]", "", text).replace("−", "-").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a solution text in canonical form, or None when the text has no number."""
    marker = _MARKER_RE.search(text)
    if marker:
        return canonical_number(marker.group(1))
    answer_is = _ANSWER_IS_RE.findall(text)
    if answer_is:
        return canonical_number(answer_is[-1])
    boxed = _BOXED_RE.findall(text)
    if boxed:
        numbers = _NUMBER_RE.findall(boxed[-1])
        if numbers:
            return canonical_number(numbers[-1])
    numbers = _NUMBER_RE.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def gsm8k_reference_answer(answer_field: str) -> str:
    """The canonical number after ``####`` in a GSM8K ``answer`` field; ValueError when it has none."""
    marker = _MARKER_RE.search(answer_field)
    number = canonical_number(marker.group(1)) if marker else None
    if number is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' line: {answer_field[-80:]!r}")
    return number
