#!/usr/bin/env python
"""Print the alignment report of a tools/prealign.py output folder.

    python tools/alignment_report.py OUT [--examples K] [--verify]

Shows coverage (aligned pairs over response tokens, and against the exact-span optimum), the histogram of
per-example coverage (also drawn in OUT/coverage_histogram.svg; its numbers are in OUT/alignment_report.json), the
share of each vocabulary with an exact counterpart, dropped and truncated examples, and the worst-aligned examples
with both sides' tokens: tokens joined by '·', tokens without an exact counterpart in [brackets].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dskd_scale.data.format import ShardFormatError, read_manifest, verify_shards
from dskd_scale.prealign.report import render_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder of tools/prealign.py")
    parser.add_argument("--examples", type=int, default=None, help="show at most this many worst examples")
    parser.add_argument("--verify", action="store_true", help="also check every shard's sha256 and row count")
    args = parser.parse_args(argv)
    try:
        manifest = verify_shards(args.out) if args.verify else read_manifest(args.out)
    except ShardFormatError as error:
        print(f"alignment_report: error: {error}", file=sys.stderr)
        return 2
    print(render_report(manifest, args.out, max_examples=args.examples))
    if args.verify:
        print(f"All {len(manifest['shards'])} shard(s) and the vocabulary map match their checksums.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
