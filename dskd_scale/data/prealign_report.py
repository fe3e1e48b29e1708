"""The alignment report of a prealigned folder: coverage, vocabulary overlap, drops, worst examples.

``write_report`` stores the worst-aligned examples (``alignment_report.json``) next to the manifest;
``render_report`` turns manifest + that file into text for a terminal, so ``tools/alignment_report.py`` needs
neither the tokenizers nor the shards. In the rendering, tokens are separated by ``·``, tokens without an
exact counterpart on the other side are in ``[brackets]``, and newlines/tabs are shown as ``\\n``/``\\t``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dskd_scale.data.format import atomic_write_bytes, canonical_json_bytes

REPORT_FILE = "alignment_report.json"
_RESPONSE_PREVIEW_CHARS = 240


def write_report(out_dir: Path, manifest: dict[str, Any], worst: list[dict[str, Any]]) -> Path:
    path = Path(out_dir) / REPORT_FILE
    atomic_write_bytes(path, canonical_json_bytes({"plan": manifest["plan"], "worst_examples": worst}))
    return path


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
        f"Vocabulary: {_percent(stats['teacher_vocab_mapped_fraction'])} of teacher ids and "
        f"{_percent(stats['student_vocab_mapped_fraction'])} of student ids have an exact counterpart "
        f"({stats['overlap_vocab_size']} overlap tokens)",
        f"Dropped examples: {dropped['total']} of {stats['source_rows']}" + (f" ({drop_detail})" * bool(drop_detail)),
        f"Truncated: {stats['prompt_truncated']} prompts (from the left), {stats['response_truncated']} responses "
        f"(from the right, no EOS); tokens straddling the prompt/response boundary (kept as prompt): student "
        f"{stats['boundary_straddles_student']}, teacher {stats['boundary_straddles_teacher']}",
    ]
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
