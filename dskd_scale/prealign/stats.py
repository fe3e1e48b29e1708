"""Statistics of a prealignment run: per-chunk accumulation, per-shard records, the merged manifest stats.

Counters are sums, so chunk -> shard -> run merging is order-independent; the worst-aligned examples are
the ``k`` lowest (coverage, example_index) pairs, also order-independent. That is what makes the manifest
identical for any number of ranks and workers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dskd_scale.prealign.sources import DROP_REASONS

_SUM_COUNTERS = (
    "examples",
    "student_response_tokens",
    "teacher_response_tokens",
    "aligned_pairs",
    "exact_span_optimum_pairs",
    "other_whitespace_pairs",
    "examples_without_pairs",
    "prompt_truncated",
    "response_truncated",
    "boundary_straddles_student",
    "boundary_straddles_teacher",
    "student_tokens",
    "teacher_tokens",
)
_MAX_COUNTERS = ("longest_student_row", "longest_teacher_row")
# Tokens kept per side when rendering a worst example (the report shows where alignment fails, not all of it).
_DETAIL_TOKENS = 160
# Per-example coverage histogram: bin k holds coverage in [k/B, (k+1)/B), the last bin also holds 1.0. The bin is
# computed in integers (aligned * B // tokens), so it never depends on float rounding.
COVERAGE_BINS = 20


def coverage_bin(aligned_pairs: int, student_response_tokens: int) -> int:
    return min(aligned_pairs * COVERAGE_BINS // max(student_response_tokens, 1), COVERAGE_BINS - 1)


def _side_detail(side: Any, boundary: int, aligned_positions: np.ndarray) -> list[list[int]]:
    """[[start, end, aligned], ...] of the response tokens, offsets relative to the response start."""
    positions = np.flatnonzero(side.response)[:_DETAIL_TOKENS]
    aligned = np.isin(positions, aligned_positions)
    starts = side.starts[positions] - boundary
    ends = side.ends[positions] - boundary
    return np.stack([starts, ends, aligned.astype(np.int64)], axis=1).tolist()


class ShardAccumulator:
    """Rows, counters and worst examples of a chunk or a shard."""

    def __init__(self, report_examples: int) -> None:
        self.report_examples = report_examples
        self.rows: list[dict[str, np.ndarray]] = []
        self.example_indices: list[int] = []
        self.counters = dict.fromkeys(_SUM_COUNTERS + _MAX_COUNTERS, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.worst: list[dict[str, Any]] = []
        self.source_rows = 0
        self.coverage_counts = [0] * COVERAGE_BINS
        self.unused_fields: dict[str, int] = {}

    def add(self, example_index: int, location: str, result: Any) -> None:
        """Add one ``rows.RowResult``."""
        self.rows.append(result.columns)
        self.example_indices.append(example_index)
        student_response = int(result.student.response.sum())
        teacher_response = int(result.teacher.response.sum())
        c = self.counters
        c["examples"] += 1
        c["student_response_tokens"] += student_response
        c["teacher_response_tokens"] += teacher_response
        c["aligned_pairs"] += result.aligned_pairs
        c["exact_span_optimum_pairs"] += result.optimum_pairs
        c["other_whitespace_pairs"] += result.other_whitespace_pairs
        c["examples_without_pairs"] += int(result.aligned_pairs == 0)
        c["prompt_truncated"] += int(result.prompt_truncated)
        c["response_truncated"] += int(result.response_truncated)
        c["boundary_straddles_student"] += result.student.straddles
        c["boundary_straddles_teacher"] += result.teacher.straddles
        c["student_tokens"] += int(result.student.ids.size)
        c["teacher_tokens"] += int(result.teacher.ids.size)
        c["longest_student_row"] = max(c["longest_student_row"], int(result.student.ids.size))
        c["longest_teacher_row"] = max(c["longest_teacher_row"], int(result.teacher.ids.size))
        coverage = result.aligned_pairs / max(student_response, 1)
        self.coverage_counts[coverage_bin(result.aligned_pairs, student_response)] += 1
        if self.report_examples and (len(self.worst) < self.report_examples
                                     or (coverage, example_index) < _rank_key(self.worst[-1])):
            self.worst.append({
                "example_index": example_index,
                "location": location,
                "coverage": coverage,
                "aligned_pairs": result.aligned_pairs,
                "exact_span_optimum_pairs": result.optimum_pairs,
                "student_response_tokens": student_response,
                "teacher_response_tokens": teacher_response,
                "response": result.text[result.boundary:],
                "student": _side_detail(result.student, result.boundary, result.columns["align_student"]),
                "teacher": _side_detail(result.teacher, result.boundary, result.columns["align_teacher"]),
            })
            self.worst = sorted(self.worst, key=_rank_key)[: self.report_examples]

    def merge(self, other: ShardAccumulator) -> None:
        """Append ``other``'s rows (which must follow this accumulator's rows in example order)."""
        self.rows.extend(other.rows)
        self.example_indices.extend(other.example_indices)
        for key in _SUM_COUNTERS:
            self.counters[key] += other.counters[key]
        for key in _MAX_COUNTERS:
            self.counters[key] = max(self.counters[key], other.counters[key])
        for reason in DROP_REASONS:
            self.dropped[reason] += other.dropped[reason]
        self.coverage_counts = [mine + theirs for mine, theirs in zip(self.coverage_counts, other.coverage_counts,
                                                                       strict=True)]
        for name, rows in other.unused_fields.items():
            self.unused_fields[name] = self.unused_fields.get(name, 0) + rows
        self.worst = sorted(self.worst + other.worst, key=_rank_key)[: self.report_examples]

    def count_drops(self, drops: dict[int, str]) -> None:
        for reason in drops.values():
            self.dropped[reason] += 1

    def count_unused_fields(self, rows: list[list[str]]) -> None:
        """Count, per field name, the rows whose text field no prompt or response uses (``prompts``)."""
        for fields in rows:
            for name in fields:
                self.unused_fields[name] = self.unused_fields.get(name, 0) + 1

    def record(self) -> dict[str, Any]:
        """The shard record's statistics part (JSON-serialisable)."""
        return {"source_rows": self.source_rows, "counters": dict(self.counters), "dropped": dict(self.dropped),
                "coverage_counts": list(self.coverage_counts),
                "unused_fields": dict(sorted(self.unused_fields.items())), "worst": self.worst}


def _rank_key(detail: dict[str, Any]) -> tuple[float, int]:
    return detail["coverage"], detail["example_index"]


def merge_shard_stats(records: list[dict[str, Any]], vocab_map: dict[str, np.ndarray],
                      report_examples: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Combine shard records into the manifest's ``stats`` and the run's worst examples."""
    counters = dict.fromkeys(_SUM_COUNTERS + _MAX_COUNTERS, 0)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    worst: list[dict[str, Any]] = []
    source_rows = 0
    coverage_counts = [0] * COVERAGE_BINS
    unused_fields: dict[str, int] = {}
    for record in records:
        for name, rows in record["unused_fields"].items():
            unused_fields[name] = unused_fields.get(name, 0) + rows
        source_rows += record["source_rows"]
        coverage_counts = [total + count for total, count in zip(coverage_counts, record["coverage_counts"],
                                                                 strict=True)]
        for key in _SUM_COUNTERS:
            counters[key] += record["counters"][key]
        for key in _MAX_COUNTERS:
            counters[key] = max(counters[key], record["counters"][key])
        for reason in DROP_REASONS:
            dropped[reason] += record["dropped"][reason]
        worst = sorted(worst + record["worst"], key=_rank_key)[:report_examples]
    teacher_to_student = vocab_map["teacher_to_student"]
    student_to_teacher = vocab_map["student_to_teacher"]
    stats = {
        "source_rows": source_rows,
        **{key: counters[key] for key in _SUM_COUNTERS},
        "dropped_examples": {"total": sum(dropped.values()), **dropped},
        "unused_fields": dict(sorted(unused_fields.items())),
        "coverage": _ratio(counters["aligned_pairs"], counters["student_response_tokens"]),
        "teacher_coverage": _ratio(counters["aligned_pairs"], counters["teacher_response_tokens"]),
        "coverage_vs_optimum": _ratio(counters["aligned_pairs"], counters["exact_span_optimum_pairs"]),
        # what the other --whitespace mode would have aligned on the same rows (its optimum = its ETA pairs)
        "coverage_other_whitespace": _ratio(counters["other_whitespace_pairs"], counters["student_response_tokens"]),
        "teacher_vocab_mapped_fraction": _ratio(int((teacher_to_student >= 0).sum()), teacher_to_student.size),
        "student_vocab_mapped_fraction": _ratio(int((student_to_teacher >= 0).sum()), student_to_teacher.size),
        "overlap_vocab_size": int(vocab_map["overlap_teacher_ids"].size),
        **{key: counters[key] for key in _MAX_COUNTERS},
        "coverage_histogram": {
            "what": "examples by coverage (aligned pairs / student response tokens); bin k is [edge k, edge k+1), "
                    "the last bin includes 1.0",
            "bin_edges": [round(k / COVERAGE_BINS, 6) for k in range(COVERAGE_BINS + 1)],
            "counts": coverage_counts,
        },
    }
    return stats, worst


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 6) if denominator else 0.0
