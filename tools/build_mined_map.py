"""Build the MinED vocabulary map of a teacher/student tokenizer pair (offline, once per pair).

    python tools/build_mined_map.py --teacher-tokenizer DIR --student-tokenizer DIR --out FILE.safetensors

Every teacher id maps to the student id whose token bytes are nearest in edit distance (ties: ordinary pieces
before byte-fallback tokens, then the smaller id); special tokens pair by role. The file also holds both byte
tables, so MinED's DTW alignment needs no tokenizer at training time. See dskd_scale/alignment/mined.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-tokenizer", required=True, help="teacher tokenizer folder (HF format)")
    parser.add_argument("--student-tokenizer", required=True, help="student tokenizer folder (HF format)")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    return parser.parse_args(argv)


def bad_input(message: str) -> int:
    """Exit status 2 with one line on stderr, like every tool."""
    print(f"build_mined_map.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from dskd_scale.alignment.mined import build_mined_map, save_mined_map
    from dskd_scale.data.format import tokenizer_fingerprint

    tokenizers = {}
    for role, folder in (("teacher", args.teacher_tokenizer), ("student", args.student_tokenizer)):
        if not os.path.isdir(folder):
            return bad_input(f"--{role}-tokenizer {folder!r} is not a folder")
        try:
            tokenizers[role] = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            return bad_input(f"--{role}-tokenizer {folder!r}: not a Hugging Face tokenizer folder ({err})")
    start, start_cpu = time.perf_counter(), time.process_time()
    mined = build_mined_map(tokenizers["teacher"], tokenizers["student"])
    # CPU time next to wall time: on a shared machine the wall clock says more about the neighbours.
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    metadata = {}
    for role, tokenizer in tokenizers.items():
        metadata[f"{role}_tokenizer"] = str(getattr(tokenizer, "name_or_path", ""))
        metadata[f"{role}_fingerprint"] = tokenizer_fingerprint(tokenizer)
        metadata[f"{role}_len"] = str(len(tokenizer))
    metadata["build_seconds"] = f"{seconds:.1f}"
    metadata["build_cpu_seconds"] = f"{cpu_seconds:.1f}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_mined_map(args.out, mined, metadata)
    except OSError as err:
        return bad_input(f"cannot write --out {args.out}: {err}")
    distance = mined.teacher_distance
    mapped = distance >= 0
    histogram = np.bincount(distance[mapped], minlength=4)
    print(
        f"wrote {args.out}: {len(distance)} teacher ids -> {len(mined.student_to_teacher)} student ids in "
        f"{seconds:.1f} s wall, {cpu_seconds:.1f} s CPU; distance 0: {histogram[0]}, 1: {histogram[1]}, "
        f"2: {histogram[2]}, "
        f">=3: {int(histogram[3:].sum())}, unmapped specials: {int((~mapped).sum())}, "
        f"mean distance {distance[mapped].mean():.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
