#!/usr/bin/env python
"""Generate the demo's data and tokenizers (no downloads, a few seconds).

    python tools/make_demo_assets.py --out DIR [--dataset knowledge|tasks] [--seed 1234]
                                     [--train 3000 --valid 200 --test 200] [--student-train 600 --label-noise 0.4]

Writes DIR/{train,valid,test}.jsonl (Dolly layout: instruction, input, prompt, output; clean; ``knowledge``: fact
questions about invented countries and word opposites, what ``make demo`` uses; ``tasks``: templated copying,
arithmetic and list tasks, the test fixtures' data), DIR/student_train.jsonl (small, a fraction --label-noise of
its answers wrong in the way a hurried annotator gets them wrong; 0 rows: not written), DIR/teacher_tokenizer/
(byte-level BPE) and
DIR/student_tokenizer/ (SentencePiece Llama-style BPE with byte fallback; punctuation split off words and
line-initial words learned, as Llama's SentencePiece does), both loadable offline
with AutoTokenizer.from_pretrained(dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from dskd_scale.demo import DATASETS, build_demo_assets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dataset", choices=DATASETS, default="knowledge", help="which generated dataset")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--valid", type=int, default=200, help="validation examples")
    parser.add_argument("--test", type=int, default=200, help="test examples")
    parser.add_argument("--student-train", type=int, default=600, help="examples of the student's own small set")
    parser.add_argument("--label-noise", type=float, default=0.4, help="fraction of wrong answers in that set")
    args = parser.parse_args(argv)
    for name in ("train", "valid", "test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.student_train < 0:
        parser.error("--student-train must be >= 0")
    if not 0.0 <= args.label_noise < 1.0:
        parser.error(f"--label-noise must be in [0, 1), got {args.label_noise}")
    try:
        paths = build_demo_assets(args.out, seed=args.seed, train=args.train, valid=args.valid, test=args.test,
                                  student_train=args.student_train, label_noise=args.label_noise,
                                  split_student_punctuation=True, dataset=args.dataset)
    except OSError as err:  # exit status 2 like every tool: bad input, one line, no traceback
        print(f"make_demo_assets.py: error: cannot write --out {args.out}: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
