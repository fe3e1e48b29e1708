#!/usr/bin/env python
"""Prealignment throughput vs tokenising both sides only, on Dolly, for gpt2->llama2 and qwen1.5->mistral.

Both measurements run side by side in this process, on the same rows, single-threaded:
- baseline: one batch call per tokenizer returning ids and offsets (the least any cross-tokenizer pipeline does);
- prealign: ``batch_rows.build_rows`` in chunks of 64 rows like the tool (the same batch calls, normalised spans,
  truncation, exact token alignment, labels) plus conversion to an Arrow table: everything but the file write.
Each is timed ``--repeats`` times, interleaved, and the best time is kept (the machine may be shared).
Also reports coverage (aligned pairs / student response tokens) and coverage vs the exact-span optimum.

    python benchmarks/bench_prealign.py [--rows 1000] [--max-length 512] [--repeats 3]

Ends with: SUMMARY prealign_vs_tokenize=<lowest ratio over pairs> coverage_vs_optimum=<lowest over pairs>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from dskd_scale.prealign.batch_rows import build_rows  # noqa: E402
from dskd_scale.prealign.rows import RowBuilder  # noqa: E402
from dskd_scale.prealign.shards import rows_to_table  # noqa: E402
from dskd_scale.utils.assets import asset_path, missing_asset_reason  # noqa: E402

PAIRS = (("gpt2", "llama2"), ("qwen1.5", "mistral"))


def _load(name: str):
    from transformers import AutoTokenizer

    path = asset_path(f"tokenizers/{name}")
    if path is None:
        sys.exit(missing_asset_reason(f"tokenizers/{name}"))
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _tokenize_only(teacher, student, texts: list[str]) -> None:
    for tokenizer in (teacher, student):
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=True)
        for encoding in encodings:  # touch the results like a consumer would
            encoding.ids, encoding.offsets  # noqa: B018


def _prealign(builder: RowBuilder, examples: list[tuple[str, str]], chunk: int):
    """In chunks, as tools/prealign.py's workers do (``--chunk-examples``)."""
    results = []
    for start in range(0, len(examples), chunk):
        results += build_rows(builder, examples[start:start + chunk])
    rows_to_table([r.columns for r in results], list(range(len(results))))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="Dolly dev rows (max 1000)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-examples", type=int, default=64, help="rows per build_rows call, as in the tool")
    args = parser.parse_args()
    data = asset_path("data/dolly/dev.jsonl")
    if data is None:
        sys.exit(missing_asset_reason("data/dolly/dev.jsonl"))
    with open(data, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle][: args.rows]
    examples = [(row["prompt"], row["output"] if isinstance(row["output"], str) else row["output"][0])
                for row in rows]
    texts = [prompt + response for prompt, response in examples]

    ratios, coverages_vs_optimum = [], []
    for teacher_name, student_name in PAIRS:
        teacher, student = _load(teacher_name), _load(student_name)
        builder = RowBuilder(teacher, student, args.max_length)
        results = _prealign(builder, examples, args.chunk_examples)  # warm-up: builds the byte tables once
        _tokenize_only(teacher, student, texts)
        best_tokenize = best_prealign = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            _tokenize_only(teacher, student, texts)
            best_tokenize = min(best_tokenize, time.perf_counter() - start)
            start = time.perf_counter()
            results = _prealign(builder, examples, args.chunk_examples)
            best_prealign = min(best_prealign, time.perf_counter() - start)
        aligned = sum(r.aligned_pairs for r in results)
        optimum = sum(r.optimum_pairs for r in results)
        student_tokens = sum(int(r.student.response.sum()) for r in results)
        ratio = best_tokenize / best_prealign
        ratios.append(ratio)
        coverages_vs_optimum.append(aligned / optimum)
        print(f"{teacher_name}->{student_name}: {len(examples)} rows | tokenize both sides "
              f"{len(examples) / best_tokenize:,.0f} rows/s | prealign {len(examples) / best_prealign:,.0f} rows/s | "
              f"ratio {ratio:.3f} | coverage {aligned / student_tokens:.3f} of student response tokens | "
              f"vs exact-span optimum {aligned / optimum:.4f} ({aligned}/{optimum}) | truncated "
              f"{sum(r.prompt_truncated for r in results)} prompts, {sum(r.response_truncated for r in results)} "
              "responses")
    print(f"SUMMARY prealign_vs_tokenize={min(ratios):.3f} coverage_vs_optimum={min(coverages_vs_optimum):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
