#!/usr/bin/env python
"""Side-by-side table of several ``tools/evaluate.py`` results files (e.g. SFT vs DSKD vs teacher).

    python tools/compare_results.py sft/results.json dskd/results.json [--labels SFT,DSKD]

Columns are the files (mean ± std over seeds where sampled), then the difference of each to the first file.
Warns when the same suite was run with different example counts or decoding settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_labels(paths: list[str]) -> list[str]:
    """Parent folder names (``sft/results.json``), else file stems (``eval/sft.json``), whichever are distinct."""
    for candidates in ([Path(p).resolve().parent.name for p in paths], [Path(p).stem for p in paths]):
        if len(set(candidates)) == len(candidates):
            return candidates
    return list(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results JSON files written by tools/evaluate.py")
    parser.add_argument("--labels", help="comma list of column names (default: distinct folder names or file stems)")
    args = parser.parse_args(argv)
    from dskd_scale.eval.results import comparability_notes, compare_table, read_results

    labels = [s.strip() for s in args.labels.split(",")] if args.labels else default_labels(args.results)
    if len(labels) != len(args.results):
        print(f"compare_results.py: error: {len(labels)} labels for {len(args.results)} files", file=sys.stderr)
        return 2
    try:
        results = [read_results(path) for path in args.results]
    except ValueError as err:
        print(f"compare_results.py: error: {err}", file=sys.stderr)
        return 2
    print(compare_table(results, labels))
    for note in comparability_notes(results, labels):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
