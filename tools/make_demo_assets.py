#!/usr/bin/env python
"""Generate the demo's data and tokenizers (no downloads, a few seconds).

    python tools/make_demo_assets.py --out DIR [--seed 1234] [--train 3000 --valid 200 --test 200]

Writes DIR/{train,valid,test}.jsonl (Dolly layout: instruction, input, prompt, output; templated tasks with
one correct answer), DIR/teacher_tokenizer/ (byte-level BPE) and DIR/student_tokenizer/ (SentencePiece
Llama-style BPE with byte fallback), both loadable offline with AutoTokenizer.from_pretrained(dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from dskd_scale.demo import build_demo_assets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--valid", type=int, default=200, help="validation examples")
    parser.add_argument("--test", type=int, default=200, help="test examples")
    args = parser.parse_args(argv)
    for name in ("train", "valid", "test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    paths = build_demo_assets(args.out, seed=args.seed, train=args.train, valid=args.valid, test=args.test)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
