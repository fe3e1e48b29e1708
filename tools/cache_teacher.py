#!/usr/bin/env python
"""Cache the frozen teacher's final hidden states once, for training with teacher.cache_dir (docs/design.md).

From a run config (the teacher section and data.train_dir; dotted overrides as for launch/train.py):
    python tools/cache_teacher.py --config RUN.yaml --out DIR [--dtype bf16|fp8_e4m3] [--mode aligned|all_positions]
Without a config, name the teacher model folder and the prealigned folder:
    python tools/cache_teacher.py --teacher MODEL_DIR [--teacher-tokenizer TOK] --data PREALIGNED --out DIR
Data-parallel (each rank writes its own shards; the result does not depend on the number of ranks):
    torchrun --nproc_per_node 8 tools/cache_teacher.py ...      srun --mpi=pmi2 python tools/cache_teacher.py ...

What is stored: mode `aligned` (default) keeps the teacher hidden state at align_teacher - 1 of every alignment
pair (what DSKD's losses read; for same-vocabulary data, every response position); mode `all_positions` keeps
every position that predicts a teacher response token, so one cache serves students with any tokenizer whose
prealigned folders were made from the same data and teacher tokenizer. The whole prealigned folder is cached, so
any data.eval_holdout split of it works (training with a cache refuses a separate data.eval_dir).
dtype bf16: 2 bytes per value; fp8_e4m3: 1 byte per value plus a float32 scale per row. The bytes per cached
token of both are printed at the end and stored in DIR/manifest.json.
Re-running the same command skips complete, checksum-valid shards (after a crash or preemption).
Exit status: 0 done, 2 bad input (missing folder, wrong flag value, bad config key), 1 other failures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dskd_scale.config.loader import ConfigError, load_config  # noqa: E402
from dskd_scale.config.run import ModelConfig, RunConfig  # noqa: E402
from dskd_scale.teacher_cache.format import DTYPES, MODES, CacheMismatch  # noqa: E402
from dskd_scale.teacher_cache.writer import (  # noqa: E402
    FORWARD_PRECISIONS,
    CacheInputError,
    CacheWriteConfig,
    CacheWriteError,
    detect_group,
    run_cache_teacher,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="run YAML: its teacher section and data.train_dir are used")
    parser.add_argument("--teacher", help="teacher model folder (instead of, or overriding, the config's teacher.path)")
    parser.add_argument("--teacher-tokenizer", help="teacher tokenizer folder (default: the teacher folder)")
    parser.add_argument("--data", help="prealigned folder (instead of, or overriding, the config's data.train_dir)")
    parser.add_argument("--out", required=True, help="cache folder to write (or to finish after an interruption)")
    parser.add_argument("--dtype", default="bf16", help=f"storage: {' or '.join(DTYPES)} (default: bf16)")
    parser.add_argument("--mode", default="aligned", help=f"rows: {' or '.join(MODES)} (default: aligned)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward (default: 8)")
    parser.add_argument("--num-shards", type=int, default=64,
                        help="output shards, the unit of work per rank and of resume (default: 64, at most one per "
                             "example); use several per rank")
    parser.add_argument("--precision", default="auto",
                        help=f"teacher forward dtype: {' or '.join(FORWARD_PRECISIONS)} (auto: bf16 on GPU, fp32 "
                             "on CPU)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the run config, e.g. teacher.path=DIR")
    return parser.parse_intermixed_args(argv)


def build_config(args: argparse.Namespace) -> CacheWriteConfig:
    """The write settings from the run config (if any) and the flags; flags win."""
    if args.config is None and args.overrides:
        raise CacheInputError(f"dotted overrides {args.overrides} need --config")
    if args.config is not None:
        if not args.config.is_file():
            raise CacheInputError(f"--config {args.config}: file not found")
        run = load_config(RunConfig, args.config, args.overrides)
        if run.teacher is None:
            raise CacheInputError(f"--config {args.config}: the run has no teacher section (kd.criterion sft?)")
        teacher, data_dir = run.teacher, run.data.train_dir
    else:
        if not args.teacher:
            raise CacheInputError("give --config RUN.yaml, or --teacher MODEL_DIR and --data PREALIGNED")
        teacher, data_dir = ModelConfig(path=args.teacher), ""
    if args.teacher:
        teacher = ModelConfig(path=args.teacher, tokenizer=args.teacher_tokenizer or "")
    elif args.teacher_tokenizer:
        teacher = ModelConfig(**{**{name: getattr(teacher, name) for name in teacher.__dataclass_fields__},
                                 "tokenizer": args.teacher_tokenizer})
    if args.teacher and not Path(args.teacher).is_dir():
        raise CacheInputError(f"--teacher {args.teacher}: model folder not found")
    tool_args = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    return CacheWriteConfig(teacher=teacher, data_dir=args.data or data_dir, out=args.out, mode=args.mode,
                            dtype=args.dtype, batch_size=args.batch_size, num_shards=args.num_shards,
                            precision=args.precision, tool_args=tool_args)


def main(argv: list[str] | None = None) -> int:
    try:
        config = build_config(parse_args(argv))
        try:
            group = detect_group()
        except RuntimeError as error:  # a multi-process launch whose processes cannot see each other
            raise CacheInputError(str(error)) from error
        manifest = run_cache_teacher(config, group)
    except (CacheInputError, CacheMismatch, ConfigError) as error:
        print(f"cache_teacher: error: {error}".replace("\n", " "), file=sys.stderr, flush=True)
        return 2
    except CacheWriteError as error:
        print(f"cache_teacher: error: {error}", file=sys.stderr, flush=True)
        return 1
    if group.rank == 0:
        per_token = manifest["bytes_per_token"]
        print(f"cache_teacher: wrote {config.out}: {manifest['num_examples']} examples, {manifest['num_rows']} rows "
              f"(mode {manifest['mode']}, dtype {manifest['dtype']}, hidden size {manifest['hidden_size']}) in "
              f"{len(manifest['shards'])} shards", flush=True)
        print("cache_teacher: bytes per cached token: "
              + ", ".join(f"{dtype} {per_token[dtype]:.0f}" for dtype in DTYPES)
              + f" (written: {per_token['written']}, {per_token['on_disk']:.1f} on disk with the index)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
