#!/usr/bin/env python
"""Side-by-side table of several ``tools/evaluate.py`` results files (e.g. SFT vs DSKD vs teacher).

    python tools/compare_results.py sft/results.json dskd/results.json [--labels SFT,DSKD]
    python tools/compare_results.py sft/results.json dskd/results.json --format md --out table.md
    python tools/compare_results.py sft/results.json dskd/results.json --format csv --out table.csv

Columns are the files (mean ± std over seeds where sampled), then the difference of each to the first file.
--format text (default) aligns columns for a terminal; md writes a GitHub Markdown table; csv writes one row per
(suite, metric) with plain numbers: <label> (mean), <label>_std and delta_<label> (to the first file) columns.
Warns when the same suite was run with different example counts or decoding settings (on stderr for md/csv).
Exit status: 0 done, 2 bad input (a file that is missing or not a results file, labels that do not fit).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2


def default_labels(paths: list[str]) -> list[str]:
    """Parent folder names (``sft/results.json``), else file stems (``eval/sft.json``), whichever are distinct."""
    for candidates in ([Path(p).resolve().parent.name for p in paths], [Path(p).stem for p in paths]):
        if len(set(candidates)) == len(candidates):
            return candidates
    return list(paths)


def comparison_rows(results_list: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, list[tuple | None]]]:
    """``(suite, metric, [(mean, std) or None per file])`` for every suite × metric any file has, in first-seen
    order, then the instruction-following average over the suites every file has (``avg(a,b)``, rougeL)."""
    from dskd_scale.eval.results import instruction_average, instruction_suites

    order: dict[tuple[str, str], None] = {}
    for results in results_list:
        for suite, entry in results["suites"].items():
            for metric in entry["metrics"]:
                if not metric.endswith("_std"):
                    order.setdefault((suite, metric), None)
    rows = []
    for suite, metric in order:
        cells = []
        for results in results_list:
            metrics = results["suites"].get(suite, {}).get("metrics", {})
            cells.append((metrics[metric], metrics.get(f"{metric}_std", 0.0)) if metric in metrics else None)
        rows.append((suite, metric, cells))
    common = [name for name in instruction_suites(results_list[0]) if all(name in r["suites"] for r in results_list)]
    if common:
        rows.append((f"avg({','.join(common)})", "rougeL",
                     [(instruction_average(r, common), 0.0) for r in results_list]))
    return rows


def _delta(cell: tuple | None, first: tuple | None) -> float | None:
    return None if cell is None or first is None else cell[0] - first[0]


def markdown_table(results_list: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    def score(cell: tuple | None) -> str:
        return "-" if cell is None else (f"{cell[0]:.2f} ± {cell[1]:.2f}" if cell[1] else f"{cell[0]:.2f}")

    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    header = ["suite", "metric", *labels, *(f"Δ {label}" for label in labels[1:])]
    lines = ["| " + " | ".join(map(escape, header)) + " |",
             "|" + "|".join([" --- ", " --- "] + [" ---: "] * (len(header) - 2)) + "|"]
    for suite, metric, cells in comparison_rows(results_list):
        deltas = [_delta(cell, cells[0]) for cell in cells[1:]]
        row = [suite, metric, *map(score, cells), *("-" if d is None else f"{d:+.2f}" for d in deltas)]
        lines.append("| " + " | ".join(map(escape, row)) + " |")
    return "\n".join(lines)


def csv_table(results_list: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["suite", "metric", *(name for label in labels for name in (label, f"{label}_std")),
                     *(f"delta_{label}" for label in labels[1:])])
    for suite, metric, cells in comparison_rows(results_list):
        values = [value for cell in cells for value in (cell if cell is not None else ("", ""))]
        deltas = [_delta(cell, cells[0]) for cell in cells[1:]]
        writer.writerow([suite, metric, *values, *("" if d is None else d for d in deltas)])
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files written by tools/evaluate.py")
    parser.add_argument("--labels", help="comma list of column names (default: distinct folder names or file stems)")
    parser.add_argument("--format", choices=["text", "md", "csv"], default="text", help="table format (default: text)")
    parser.add_argument("--out", type=Path, help="write the table to this file instead of stdout")
    args = parser.parse_args(argv)
    from dskd_scale.eval.results import comparability_notes, compare_table, read_results

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else default_labels(args.results)
    if len(labels) != len(args.results):
        print(f"compare_results.py: error: {len(labels)} labels for {len(args.results)} files", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        results = [read_results(path) for path in args.results]
    except ValueError as err:
        print(f"compare_results.py: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    render = {"text": compare_table, "md": markdown_table, "csv": csv_table}[args.format]
    table = render(results, labels).rstrip("\n") + "\n"
    notes = [f"note: {note}" for note in comparability_notes(results, labels)]
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table, encoding="utf-8")
        except OSError as err:
            print(f"compare_results.py: error: cannot write --out {args.out}: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(table)
    # Notes never go into a machine-readable table.
    for note in notes:
        print(note, file=sys.stderr if args.format != "text" or args.out is not None else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
