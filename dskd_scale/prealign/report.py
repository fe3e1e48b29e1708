"""The alignment report of a prealigned folder: coverage, its per-example histogram, vocabulary overlap, drops,
worst examples.

``write_report`` stores the worst-aligned examples and the coverage histogram (``alignment_report.json``) and a
picture of the histogram (``coverage_histogram.svg``) next to the manifest; ``render_report`` turns manifest + that
file into text for a terminal, so ``tools/alignment_report.py`` needs neither the tokenizers nor the shards.
Training logs the same histogram to TensorBoard (``dskd_scale.tb_logging``).
In the rendering, tokens are separated by ``·``, tokens without an exact counterpart on the other side are in
``[brackets]``, and newlines/tabs are shown as ``\\n``/``\\t``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dskd_scale.data.format import atomic_write_bytes, canonical_json_bytes

REPORT_FILE = "alignment_report.json"
HISTOGRAM_FILE = "coverage_histogram.svg"
_RESPONSE_PREVIEW_CHARS = 240
_TEXT_BAR_WIDTH = 40


def write_report(out_dir: Path, manifest: dict[str, Any], worst: list[dict[str, Any]]) -> Path:
    """``alignment_report.json`` (worst examples, coverage histogram) and ``coverage_histogram.svg``."""
    path = Path(out_dir) / REPORT_FILE
    histogram = manifest["stats"]["coverage_histogram"]
    atomic_write_bytes(Path(out_dir) / HISTOGRAM_FILE, histogram_svg(histogram, manifest["stats"]["coverage"]))
    atomic_write_bytes(path, canonical_json_bytes({"plan": manifest["plan"], "coverage_histogram": histogram,
                                                   "worst_examples": worst}))
    return path


def unused_fields_message(unused: dict[str, int]) -> str:
    listed = ", ".join(f"{name!r} ({rows} rows)" for name, rows in unused.items())
    return (f"Fields in the data that no prompt uses (their text is not in the prompt): {listed}; name them in a "
            "--template, or list them in --ignore-fields to leave them out on purpose")


def render_histogram(histogram: dict[str, Any]) -> list[str]:
    """The coverage histogram as text lines: ``[0.95, 1.00]  ####....  123``."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    peak = max(max(counts), 1)
    lines = []
    for k, count in enumerate(counts):
        bar = "#" * round(_TEXT_BAR_WIDTH * count / peak)
        closing = "]" if k == len(counts) - 1 else ")"
        lines.append(f"  [{edges[k]:.2f}, {edges[k + 1]:.2f}{closing} {bar:<{_TEXT_BAR_WIDTH}} {count}")
    return lines


def histogram_svg(histogram: dict[str, Any], overall_coverage: float) -> bytes:
    """A bar chart of the coverage histogram as a standalone SVG file (deterministic bytes, no plotting library)."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    width, height, left, right, top, bottom = 640, 360, 60, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(max(counts), 1)
    bar_w = plot_w / len(counts)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="14">Per-example alignment coverage '
        f'({sum(counts)} examples, overall {_percent(overall_coverage)})</text>',
    ]
    for k, count in enumerate(counts):
        bar_h = plot_h * count / peak
        x = left + k * bar_w
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - bar_h:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{bar_h:.1f}" fill="#4878a8"><title>[{edges[k]:.2f}, {edges[k + 1]:.2f}'
                     f'{"]" if k == len(counts) - 1 else ")"}: {count}</title></rect>')
    for k in range(0, len(edges), 2):
        x = left + k * bar_w
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{edges[k]:.1f}</text>')
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{round(peak * fraction)}</text>')
    parts += [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="black"/>',
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 12}" text-anchor="middle">coverage = aligned pairs / '
        f'student response tokens</text>',
        f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">examples</text>',
        "</svg>",
    ]
    return ("\n".join(parts) + "\n").encode("utf-8")


def read_worst_examples(out_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The stored worst examples, or None when the file is absent or belongs to another run."""
    path = Path(out_dir) / REPORT_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if stored.get("plan") != manifest.get("plan"):
        return None
    return stored["worst_examples"]


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def render_tokens(response: str, tokens: list[list[int]]) -> str:
    """``[[start, end, aligned], ...]`` (offsets into ``response``) -> ``The·[quick]·brown·<eos>``."""
    pieces = []
    for start, end, aligned in tokens:
        surface = "<eos>" if start == end else _escape(response[start:end])
        pieces.append(surface if aligned else f"[{surface}]")
    return "·".join(pieces)


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}%"


def _whitespace_lines(manifest: dict[str, Any]) -> list[str]:
    """Coverage under both whitespace modes (manifests written before the option exist: no line)."""
    stats = manifest["stats"]
    if "coverage_other_whitespace" not in stats:
        return []
    mode = manifest.get("alignment", {}).get("whitespace", "exact")
    other = "paper" if mode == "exact" else "exact"
    return [f"  whitespace {mode} (used): {_percent(stats['coverage'])}; whitespace {other} would give "
            f"{_percent(stats['coverage_other_whitespace'])} ({stats['other_whitespace_pairs']} pairs)"]


def render_report(manifest: dict[str, Any], out_dir: Path | str, *, max_examples: int | None = None) -> str:
    """A terminal report of a prealigned folder (see the module docstring for the token notation)."""
    stats = manifest["stats"]
    teacher, student = manifest["teacher_tokenizer"], manifest["student_tokenizer"]
    dropped = stats["dropped_examples"]
    drop_detail = ", ".join(f"{reason} {count}" for reason, count in dropped.items() if reason != "total" and count)
    lines = [
        f"Prealigned output {out_dir}: {stats['examples']} examples in {len(manifest['shards'])} shard(s) "
        f"(format v{manifest['format_version']}, max_length {manifest['max_length']})",
        *(f"  {role} tokenizer {entry['name_or_path']} (len {entry['len']}, fingerprint {entry['fingerprint'][:12]})"
          for role, entry in (("teacher", teacher), ("student", student))),
        f"Coverage: {stats['aligned_pairs']} aligned pairs = {_percent(stats['coverage'])} of "
        f"{stats['student_response_tokens']} student response tokens, {_percent(stats['teacher_coverage'])} of "
        f"{stats['teacher_response_tokens']} teacher response tokens",
        f"  vs the exact-span optimum ({stats['exact_span_optimum_pairs']} pairs): "
        f"{_percent(stats['coverage_vs_optimum'])}; examples without any pair: {stats['examples_without_pairs']}",
        *_whitespace_lines(manifest),
        f"Vocabulary: {_percent(stats['teacher_vocab_mapped_fraction'])} of teacher ids and "
        f"{_percent(stats['student_vocab_mapped_fraction'])} of student ids have an exact counterpart "
        f"({stats['overlap_vocab_size']} overlap tokens)",
        f"Dropped examples: {dropped['total']} of {stats['source_rows']}" + (f" ({drop_detail})" * bool(drop_detail)),
        f"Truncated: {stats['prompt_truncated']} prompts (from the left), {stats['response_truncated']} responses "
        f"(from the right, no EOS); tokens straddling the prompt/response boundary (kept as prompt): student "
        f"{stats['boundary_straddles_student']}, teacher {stats['boundary_straddles_teacher']}",
    ]
    unused = stats.get("unused_fields")
    if unused:
        lines.append(unused_fields_message(unused))
    histogram = stats.get("coverage_histogram")
    if histogram is None:
        lines.append("(no coverage histogram: the folder was written by an older version; re-run tools/prealign.py)")
    else:
        lines.append(f"Examples by coverage (picture: {Path(out_dir) / HISTOGRAM_FILE}):")
        lines += render_histogram(histogram)
    worst = read_worst_examples(Path(out_dir), manifest)
    if worst is None:
        lines.append("(no worst-example details: alignment_report.json is missing or from another run)")
        return "\n".join(lines)
    worst = worst[:max_examples] if max_examples is not None else worst
    if worst:
        lines.append(f"Worst aligned examples ({len(worst)}); tokens joined by '·', [unaligned] in brackets:")
    for example in worst:
        response = example["response"]
        preview = _escape(response[:_RESPONSE_PREVIEW_CHARS]) + "..." * (len(response) > _RESPONSE_PREVIEW_CHARS)
        lines += [
            f"- example {example['example_index']} ({example['location']}): coverage {_percent(example['coverage'])} "
            f"({example['aligned_pairs']} pairs / {example['student_response_tokens']} student tokens; exact-span "
            f"optimum {example['exact_span_optimum_pairs']})",
            f"    response: {preview}",
            f"    student:  {render_tokens(response, example['student'])}",
            f"    teacher:  {render_tokens(response, example['teacher'])}",
        ]
    return "\n".join(lines)
